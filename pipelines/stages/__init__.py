"""One module per pipeline stage; each exposes ``run(context) -> outputs`` and reads top to bottom."""
