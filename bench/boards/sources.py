"""Where the VMs' packages come from: this machine's own apt sources (`enorm.mirrors`).

The lab writes no registry's host name: a board's apt gets the machine's Debian entries
for the release (the release itself and its `-updates` / `-security` companions, by what
apt downloaded: `Origin: Debian`), and debootstrap the archive `enorm.mirrors` picks.
"""

from __future__ import annotations

from pathlib import Path

from enorm import mirrors


def debian_lines(suite: str, root: Path = Path("/")) -> str:
    """One-line `deb` entries of the machine's Debian archives for `suite` and its
    companions, in apt's order (a vendor archive serving the same suite left out)."""
    out = []
    for e in mirrors.entries(root):
        for s in e.suites:
            if s != suite and not s.startswith(suite + "-"):
                continue
            rel = mirrors.release(e.uri, s, root)
            if rel is None or rel.origin == "Debian":
                out.append(f"deb {e.uri.rstrip('/')} {s} {' '.join(e.components)}")
    if not out:
        raise RuntimeError(f"no apt source of this machine serves Debian {suite} "
                           f"(looked in {root / 'etc/apt'})")
    return "\n".join(out)


def debian_mirror(suite: str) -> str:
    """The archive debootstrap builds a board's disk from."""
    return mirrors.debian_mirror(suite).rstrip("/")
