"""MkDocs hooks of sqlflag's site (mkdocs.yml ``hooks:``).

* ``<!-- sqlflag:statements -->`` in a page becomes each database's statements, compiled from
  ``sqlflag._dialects`` by the SQLAlchemy dialect of its driver at build time, so the page
  shows what the code sends and cannot drift from it.
* The files of ``contrib/`` (Prometheus rules, Grafana dashboard) are published with the site
  under ``contrib/``, so pages link to them and the links are checked like any other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- sqlflag:statements -->"
CONTRIB = ("grafana/sqlflag-dashboard.json", "prometheus/sqlflag-alerts.yml",
           "prometheus/sqlflag-alerts.test.yml")

#: (registered name, tab title, SQLAlchemy dialect module and driver)
DATABASES = [
    ("postgresql", "PostgreSQL (psycopg)", "postgresql", "psycopg"),
    ("mariadb", "MariaDB / MySQL (PyMySQL)", "mysql", "pymysql"),
    ("sqlite", "SQLite", "sqlite", "pysqlite"),
]

#: (attribute of the database class, what the statement is for)
STATEMENTS = [
    ("check", "The check: a renewal, an acquisition attempt and a follower check alike"),
    ("renew_many", "Batched renewal of the tenures one process holds"),
    ("release", "Release, by `close()`"),
    ("ensure_row", "The flag's row, inserted already expired at `build()` unless it exists"),
]

_CLAUSES = ("WITH", "SELECT", "FROM", "WHERE", "SET", "RETURNING", "VALUES", "ON CONFLICT",
            "ON DUPLICATE KEY UPDATE", "LEFT OUTER JOIN", "UPDATE", "INSERT", "ORDER BY")
_STATEMENT_START = re.compile(r"\s*(WITH|SELECT|UPDATE|INSERT)\b")
_TOKEN = re.compile(
    r"'(?:[^']|'')*'|\"[^\"]*\"|\(|\)|,|"
    + "|".join(r"\b" + k.replace(" ", r"\s+") + r"\b" for k in _CLAUSES)
    + r"|[^'\"(),]+?(?=['\"(),]|\b(?:" + "|".join(k.replace(" ", r"\s+") for k in _CLAUSES)
    + r")\b|$)",
)


def format_sql(sql: str) -> str:
    """Break a compiled statement into one clause per line, a CTE's body indented; a SET
    list gets one assignment per line."""
    sql = re.sub(r"\s*\n\s*", " ", sql).strip()
    out: list[str] = []
    line = ""
    stack: list[bool] = []  # per open parenthesis: does it hold a statement?
    in_set: list[bool] = [False]
    pos = 0

    def newline(depth: int) -> None:
        nonlocal line
        if line.strip():
            out.append(line.rstrip())
        line = "    " * depth

    while pos < len(sql):
        match = _TOKEN.match(sql, pos)
        if match is None:  # pragma: no cover - the pattern matches any character
            line += sql[pos]
            pos += 1
            continue
        tok = match.group(0)
        pos = match.end()
        statement_level = not stack or stack[-1]
        depth = sum(stack)
        upper = re.sub(r"\s+", " ", tok).upper()
        if tok == "(":
            # Only a CTE's body goes on lines of its own; a scalar subquery stays inline.
            holds = bool(_STATEMENT_START.match(sql, pos)) and line.rstrip().upper().endswith(" AS")
            stack.append(holds)
            in_set.append(False)
            line += tok
            if holds:
                newline(depth + 1)
        elif tok == ")":
            holds = stack.pop() if stack else False
            in_set.pop()
            if holds:
                newline(depth - 1)
            line += tok
        elif upper in _CLAUSES and statement_level:
            in_set[-1] = upper in ("SET", "ON DUPLICATE KEY UPDATE")
            if not (upper == "SELECT" and line.rstrip().endswith("(")) and not (
                upper == "UPDATE" and line.rstrip().upper().endswith(" DO")
            ):
                newline(depth)
            line += upper if upper != tok else tok
        elif tok == "," and statement_level and in_set[-1]:
            line += ","
            newline(depth + 1)
        else:
            line += tok.lstrip() if line.endswith(" ") or not line.strip() else tok
    newline(0)
    return "\n".join(out)


def render_statements() -> str:
    """Markdown: one tab per database, each statement in a SQL block."""
    import importlib

    from sqlflag._dialects import by_name

    parts: list[str] = []
    for name, title, module, driver in DATABASES:
        dialect_module = importlib.import_module(f"sqlalchemy.dialects.{module}.{driver}")
        dialect = dialect_module.dialect(paramstyle="named")
        if name == "mariadb":
            dialect.is_mariadb = True
        db = by_name(name)
        parts.append(f'=== "{title}"\n')
        for attr, what in STATEMENTS:
            sql = str(getattr(db, attr).compile(dialect=dialect))
            sql = re.sub(r"__\[POSTCOMPILE_(\w+)\]", r":\1", sql)
            block = format_sql(sql)
            parts.append(f"    **{what}** (`{type(db).__name__}.{attr}`)\n")
            parts.append("    ```sql\n" + "\n".join(
                "    " + ln if ln else "" for ln in block.splitlines()) + "\n    ```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render_statements())
    return markdown


def on_files(files: Files, config: Any) -> Files:
    for rel in CONTRIB:
        src = ROOT / "contrib" / rel
        if not src.exists():
            raise FileNotFoundError(f"contrib/{rel} is published with the site but missing")
        files.append(File.generated(config, f"contrib/{rel}", abs_src_path=str(src)))
    return files
