"""Generation: sampling snapshots into committed shards, the classes a conditional sample set draws, figures."""
