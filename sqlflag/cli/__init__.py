"""The ``sqlflag`` command line: ``main`` and the parser in :mod:`sqlflag.cli.main`, one module
per command, shared helpers in :mod:`sqlflag.cli._common`.

Imports nothing, so that ``python -m sqlflag.cli.demo`` (the demo's workers) loads that module
only once, as ``__main__``.
"""
