"""The Ray workflow DAG (prepare -> tune -> train -> sample -> evaluate -> register) built on ddpm_core."""
