"""The ``sqlflag`` command line: ``main`` in :mod:`sqlflag.cli.main`, one module per command."""
