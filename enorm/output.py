"""Terminal output shared by `enorm` and `enorm-cloud`.

On a terminal: rich tables and colour. Piped: one plain line per row, tab-separated with
a header line, so `grep`/`cut`/`awk` work and nothing is folded or clipped. Progress and
errors go to stderr, results to stdout. rich is imported only for a terminal: the
daemon (`serve`, under systemd) writes plain lines and keeps its 1.5 MB.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CODES = (
    (EXIT_OK, "done"),
    (EXIT_FAILED, "the operation failed (the message says why)"),
    (EXIT_USAGE, "bad usage: a wrong option, argument or config file, or a board that "
                 "cannot enforce the limits (`serve`)"),
    (EXIT_UNREACHABLE, "the daemon or edge node does not answer"),
)

@functools.cache
def _console(stderr: bool) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def on_terminal() -> bool:
    return sys.stdout.isatty()


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A table on a terminal; a header line and one tab-separated line per row otherwise."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if on_terminal():
        from rich.table import Table

        t = Table(title=title)
        for c in columns:
            t.add_column(c, overflow="fold")
        for row in cells:
            t.add_row(*row)
        _console(False).print(t)
        return
    sys.stdout.write("\t".join(columns) + "\n")
    for row in cells:
        sys.stdout.write("\t".join(v.replace("\t", " ").replace("\n", " ") for v in row) + "\n")
    sys.stdout.flush()


def line(text: str) -> None:
    """A result line on stdout. Text is never read as markup: it may hold what a tenant
    or a config chose."""
    if on_terminal():
        _console(False).print(text, markup=False)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def progress(text: str) -> None:
    """A whole progress line on stderr, so that piped results stay clean."""
    if sys.stderr.isatty():
        _console(True).print("[cyan]>[/] ", end="")
        _console(True).print(text, markup=False)
    else:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    if sys.stderr.isatty():
        _console(True).print("[red]error:[/red] ", end="")
        _console(True).print(message, markup=False)
    else:
        sys.stderr.write(f"error: {message}\n")
    sys.exit(code)
