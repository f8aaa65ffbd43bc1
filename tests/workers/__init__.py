"""Helpers for the test suite: a TCP proxy, direct row edits, samplers, a subprocess worker."""
