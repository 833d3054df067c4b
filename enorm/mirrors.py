"""Where Debian packages come from: the Debian archive of the machine's own apt sources.

enorm writes no registry's host name anywhere: an image build (debootstrap) and the setup
script's one bullseye package take the archive that apt on this machine already uses, or
the operator's setting (`--mirror`, ENORM_DEBIAN_MIRROR, a recipe's `mirror`).

Sources are read as apt reads them: /etc/apt/sources.list and sources.list.d/*.list (one
line per entry) and sources.list.d/*.sources (deb822 paragraphs), in that order. Other
vendors' repositories sit beside Debian's and may serve a suite of the same name
(Raspberry Pi OS's own archive and Armbian's both serve `bookworm main`), so an entry is
not taken for being first. The choice, in order:

1. what apt downloaded from the entry says (its InRelease or Release file under
   /var/lib/apt/lists): `Origin: Debian` and the suite as `Codename` or `Suite`, or for
   another suite (bullseye's xstream on a bookworm machine) any Debian release suite
   (not -security, -updates, -backports), whose archive serves the others too;
   an entry whose Release names another origin (Raspbian, Raspberry Pi Foundation,
   Armbian) is never taken;
2. where apt has no lists yet: an entry for the suite signed by Debian's archive keyring,
   then one for the suite in apt's order, then a Debian-signed entry of another suite.

A Raspberry Pi OS 32-bit board (only Raspbian and the Pi archive) has no Debian archive:
the error says which setting names one.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV = "ENORM_DEBIAN_MIRROR"
SCHEMES = ("http://", "https://", "file:/")
DEBIAN_KEYRING = "debian-archive-keyring"
# Characters apt's URItoFileName quotes before it turns '/' into '_'.
_QUOTED = "\\|{}[]<>\"^~_=!@#$%^*"


class MirrorError(RuntimeError):
    """No usable Debian archive; the message names the setting that gives one."""


@dataclass(frozen=True)
class Entry:
    """One `deb` entry of the apt sources (a deb822 paragraph gives one per URI)."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str
    where: str  # file:line, for messages


@dataclass(frozen=True)
class Release:
    """The fields of a downloaded (In)Release file that say whose archive it is."""

    origin: str
    label: str
    suite: str
    codename: str


def check_uri(uri: str, field: str = "mirror") -> str:
    """An archive URL debootstrap can use (http, https, file), without a trailing slash."""
    if not uri.startswith(SCHEMES) or not re.sub(r"^[a-z]+:/+", "", uri).strip("/"):
        raise MirrorError(f"{field}: {uri!r} is not an http://, https:// or file:/// URL")
    return uri.rstrip("/")


# -- reading the sources ---------------------------------------------------------------
_ONE_LINE = re.compile(r"^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)(.*)$")


def _one_line(path: Path) -> Iterator[Entry]:
    for n, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        m = _ONE_LINE.match(raw.split("#", 1)[0].strip())
        if m:
            options, uri, suite, components = m.groups()
            opts = dict(o.partition("=")[::2] for o in (options or "").split())
            yield Entry(uri, (suite,), tuple(components.split()), opts.get("signed-by", ""),
                        f"{path}:{n}")


def _paragraphs(text: str) -> Iterator[tuple[int, dict[str, str]]]:
    """deb822: paragraphs of `Field: value`, continued on indented lines; yields each
    with the number of its first line."""
    fields: dict[str, str] = {}
    start, key = 0, ""
    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield start, fields
            fields, key = {}, ""
        elif line[0] in " \t" and key:
            fields[key] = f"{fields[key]}\n{line.strip()}".lstrip("\n")
        else:
            start = start if fields else n
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()


def _deb822(path: Path) -> Iterator[Entry]:
    for n, f in _paragraphs(path.read_text(errors="replace")):
        if "deb" not in f.get("types", "").split() or f.get("enabled", "yes") == "no":
            continue
        for uri in f.get("uris", "").split():
            yield Entry(uri, tuple(f.get("suites", "").split()),
                        tuple(f.get("components", "").split()),
                        f.get("signed-by", ""), f"{path}:{n}")


def entries(root: Path = Path("/")) -> list[Entry]:
    """Every `deb` entry of the machine's apt sources, in apt's order."""
    etc = root / "etc/apt"
    out: list[Entry] = []
    if (etc / "sources.list").is_file():
        out += _one_line(etc / "sources.list")
    parts = etc / "sources.list.d"
    for path in sorted(parts.glob("*")) if parts.is_dir() else []:
        if path.suffix == ".list":
            out += _one_line(path)
        elif path.suffix == ".sources":
            out += _deb822(path)
    return out


def _mirror_list(uri: str, root: Path) -> str:
    """`mirror+file:/etc/apt/mirrors/debian.list` -> the first URL it lists."""
    path = root / uri.split(":", 1)[1].lstrip("/")
    try:
        for line in path.read_text().splitlines():
            word = line.split("#", 1)[0].split()
            if word and word[0].startswith(SCHEMES):
                return word[0]
    except OSError:
        pass
    return ""


# -- what apt downloaded ---------------------------------------------------------------
def lists_name(uri: str, suite: str) -> str:
    """The file name apt gives an entry's Release in its lists directory, without the
    `InRelease` / `Release` at the end."""
    url = uri.rstrip("/") + f"/dists/{suite}/"
    url = re.sub(r"^[a-z+]+://", "", url)
    url = re.sub(r"^[^/@]*@", "", url)  # user:password@
    quoted = "".join(f"%{ord(c):02x}" if c in _QUOTED else c for c in url)
    return quoted.replace("/", "_")


def release(uri: str, suite: str, root: Path = Path("/")) -> Release | None:
    """The downloaded Release of `uri`'s `suite`, None where apt has none."""
    lists = root / "var/lib/apt/lists"
    for name in ("InRelease", "Release"):
        path = lists / (lists_name(uri, suite) + name)
        try:
            text = path.read_text(errors="replace")[:8192]
        except OSError:
            continue

        def field(key: str, text: str = text) -> str:
            m = re.search(rf"^{key}:[ \t]*(.*)$", text, re.MULTILINE)
            return m.group(1).strip() if m else ""

        return Release(field("Origin"), field("Label"), field("Suite"), field("Codename"))
    return None


# -- the choice --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Seen:
    entry: Entry
    uri: str  # the URL to use (a mirror+file list resolved)
    suite: str  # the entry's suite this is about
    rel: Release | None


def _is_release_suite(name: str) -> bool:
    return "-" not in name and "/" not in name


def debian_mirror(suite: str, *, override: str | None = None,
                  root: Path = Path("/")) -> str:  # fmt: skip
    """The Debian archive that serves `suite`: the override if given, else the one found
    in the machine's apt sources (see the module's docstring for the rule)."""
    if override:
        return check_uri(override)
    seen: list[_Seen] = []
    for e in entries(root):
        uri = _mirror_list(e.uri, root) if e.uri.startswith("mirror+file:") else e.uri
        if not uri.startswith(SCHEMES) or "main" not in e.components:
            continue
        for s in e.suites:
            rel = release(e.uri, s, root) or (release(uri, s, root) if uri != e.uri else None)
            seen.append(_Seen(e, uri, s, rel))

    def serves(x: _Seen) -> bool:
        return suite in (x.suite, *((x.rel.codename, x.rel.suite) if x.rel else ()))

    def debian(x: _Seen) -> bool:
        return x.rel is not None and x.rel.origin == "Debian"

    unknown = [x for x in seen if x.rel is None]
    debian_signed = [x for x in unknown if DEBIAN_KEYRING in x.entry.signed_by]
    for choice in (
        [x for x in seen if debian(x) and serves(x)],
        [x for x in seen if debian(x) and x.rel.label == "Debian"
         and _is_release_suite(x.rel.codename)],
        [x for x in debian_signed if serves(x)],
        [x for x in unknown if serves(x)],
        [x for x in debian_signed if _is_release_suite(x.suite)],
    ):  # fmt: skip
        if choice:
            return check_uri(choice[0].uri, f"apt source {choice[0].entry.where}")
    found = "; ".join(
        f"{x.entry.where}: {x.uri} {x.suite} ({x.rel.origin if x.rel else 'no Release'})"
        for x in seen) or "no deb entry with main"  # fmt: skip
    raise MirrorError(
        f"mirror: no Debian archive serving {suite} in the apt sources of "
        f"{root / 'etc/apt'} ({found}); name one with --mirror URL, {ENV}=URL or the "
        f"recipe's `mirror`")


def main(argv: list[str]) -> int:
    """`python3 -m enorm.mirrors SUITE`: print the Debian archive for SUITE (scripts)."""
    if len(argv) != 1:
        print("usage: python3 -m enorm.mirrors SUITE", file=sys.stderr)
        return 2
    try:
        override = os.environ.get(ENV)
        print(check_uri(override, ENV) if override else debian_mirror(argv[0]))
    except MirrorError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
