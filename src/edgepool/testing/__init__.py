"""Helpers shipped for tests: forked multi-rank runs and tiny specs."""
