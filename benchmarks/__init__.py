"""sqlflag's benchmark suite: sqlflag beside sqlalchemy-dlock, mithril-locks and the Go original.

Not part of the unit tests. Run it with ``python -m benchmarks --out benchmarks/out`` (see
the README's "Performance" section): the command builds its own virtualenv in
``benchmarks/.venv-peers``, installs the peer libraries there (never into the project's
environment), and runs every contender in subprocesses of that virtualenv.
"""
