"""The pipeline's stages, one module each: ``run(context, *upstream_outputs) -> outputs`` (see :mod:`pipelines.dag`)."""
