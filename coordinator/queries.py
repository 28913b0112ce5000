"""Named SQL: every statement lives in ``sql/queries.sql`` under a ``-- name:`` line.

A name that starts with ``_`` is a fragment, not a statement: ``{_name}`` in a statement
is replaced by it (other ``{...}`` are left for psycopg composition).

``Q.lease_pending_batch`` is the ``sqlalchemy.text`` of the statement of that name; an
unknown name fails at attribute access, and the file is parsed once, on first use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from sqlalchemy import TextClause, text

SQL_FILE = Path(__file__).with_name("sql") / "queries.sql"
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse(source: str) -> dict[str, str]:
    """Split ``source`` into ``{name: statement}``; comment lines are dropped."""
    parts = _NAME.split(source)
    statements: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("--")]
        statements[name] = "\n".join(lines).strip().rstrip(";")
    fragments = {n: s for n, s in statements.items() if n.startswith("_")}
    return {name: _splice(statement, fragments) for name, statement in statements.items()
            if name not in fragments}


def _splice(statement: str, fragments: dict[str, str]) -> str:
    for name, body in fragments.items():
        statement = statement.replace(f"{{{name}}}", body)
    return statement


@cache
def _statements() -> dict[str, str]:
    return parse(SQL_FILE.read_text())


@cache
def _clause(name: str) -> TextClause:
    """One ``TextClause`` per statement, built once: building it scans the text for its
    ``:binds`` (0.2 ms for the 3.5 kB claim, per lease). A ``TextClause`` is immutable;
    ``bindparams()`` and ``columns()`` return new ones."""
    return text(_statements()[name])


class _Queries:
    def __getattr__(self, name: str) -> TextClause:
        if name not in _statements():
            raise AttributeError(f"no query named {name!r} in {SQL_FILE}")
        return _clause(name)

    def names(self) -> list[str]:
        return list(_statements())

    def sql(self, name: str) -> str:
        return _statements()[name]


Q = _Queries()


def int_array(values: Iterable[int]) -> str:
    """``values`` as PostgreSQL array text (``{1,2,3}``), for a ``CAST(:p AS bigint[])``
    parameter. psycopg dumps a Python list element by element in Python: 15 ms for 10k
    ints, against 2.4 ms for this join (bench note in BENCHMARKS.md, "Array parameters")."""
    return "{" + ",".join(map(str, map(int, values))) + "}"


def text_array(values: Iterable[str]) -> str:
    """``values`` as PostgreSQL array text, every element double-quoted with ``\\`` and
    ``"`` escaped, so any text (commas, braces, quotes, ``NULL``) stays one element."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                          for v in values) + "}"
