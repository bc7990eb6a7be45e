"""Dataset writers: `python write_datasets/<name>.py ...` or `python -m write_datasets.<name> ...`."""
