"""Terminal output shared by `enorm` and `enorm-cloud`.

On a terminal: rich tables and colour. Piped: one plain line per row, tab-separated with
a header line, so `grep`/`cut`/`awk` work and nothing is folded or clipped. Progress and
errors go to stderr, results to stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from rich.console import Console
from rich.table import Table

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CODES = (
    (EXIT_OK, "done"),
    (EXIT_FAILED, "the operation failed (the message says why)"),
    (EXIT_USAGE, "bad usage: a wrong option, argument or config file, or a board that "
                 "cannot enforce the limits (`serve`)"),
    (EXIT_UNREACHABLE, "the daemon or edge node does not answer"),
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def on_terminal() -> bool:
    return out.is_terminal


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A table on a terminal; a header line and one tab-separated line per row otherwise."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if on_terminal():
        t = Table(title=title)
        for c in columns:
            t.add_column(c, overflow="fold")
        for row in cells:
            t.add_row(*row)
        out.print(t)
        return
    sys.stdout.write("\t".join(columns) + "\n")
    for row in cells:
        sys.stdout.write("\t".join(v.replace("\t", " ").replace("\n", " ") for v in row) + "\n")
    sys.stdout.flush()


def line(text: str) -> None:
    """A result line on stdout. Text is never read as markup: it may hold what a tenant
    or a config chose."""
    if on_terminal():
        out.print(text, markup=False)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def progress(text: str) -> None:
    """A whole progress line on stderr, so that piped results stay clean."""
    if err.is_terminal:
        err.print("[cyan]>[/] ", end="")
        err.print(text, markup=False)
    else:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    if err.is_terminal:
        err.print("[red]error:[/red] ", end="")
        err.print(message, markup=False)
    else:
        sys.stderr.write(f"error: {message}\n")
    sys.exit(code)
