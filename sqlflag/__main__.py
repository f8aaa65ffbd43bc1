"""``python -m sqlflag``: the ``sqlflag`` command line."""

from sqlflag._cli import main

raise SystemExit(main())
