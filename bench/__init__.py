"""Benchmarks: run as scripts, print a table and write JSON; never part of the tests."""
