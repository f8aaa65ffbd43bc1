"""``python -m sqlflag``: the ``sqlflag`` command line."""

try:
    from sqlflag.cli.main import main
except KeyboardInterrupt:  # Ctrl-C while SQLAlchemy and Alembic are still importing
    raise SystemExit(130) from None  # EXIT_INTERRUPTED of sqlflag.cli._common: not importable yet

raise SystemExit(main())
