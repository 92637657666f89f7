"""Straightforward implementations of the original algorithms: the yardstick for tests and bench.py."""
