"""Evaluation tools: `python eval/<name>.py ...` or `python -m eval.<name> ...`."""
