"""The model registry: the champion a run compares against, and the pyfunc model a version serves."""
