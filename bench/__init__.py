"""Benchmarks, run on demand with `python -m bench` (or `make bench`); never part of the test suite.

Every figure is a ratio against a baseline measured in the same run, rounds alternating the two sides,
so a busy or slow machine moves both numbers and the ratio stays meaningful.
"""
