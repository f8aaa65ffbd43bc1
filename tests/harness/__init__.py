"""Fault-injection harness for sqlflag: worker processes, a TCP proxy, faults, a checker.

Long run: ``python -m tests.harness --dialect postgresql --duration 600`` (see
``docs/faults.md``). The short version runs in CI as ``tests/test_faults.py``.
"""
