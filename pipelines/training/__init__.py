"""Data-parallel DDPM training on Ray Train: the job a worker receives (:mod:`.job`), the loop it runs
(:mod:`.loop`) with its state (:mod:`.state`) and hooks (:mod:`.hooks`), and the driver's side (:mod:`.trainer`)."""
