"""The event-stream benchmark: `python -m bench.streams` (see __main__.py and README.md beside it)."""
