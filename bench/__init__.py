"""Benchmarks: `python bench/<name>.py ...` or `python -m bench.<name> ...`; they print a table and write JSON."""
