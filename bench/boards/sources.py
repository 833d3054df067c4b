"""Where the VMs' packages come from: this machine's own apt sources.

The lab writes no registry's host name: the Debian mirror is the one this machine's apt
uses (deb822 `*.sources` or one-line `sources.list` entries), picked among the machine's
other repositories by its suites (the Debian release and its `-updates` / `-security`
companions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

APT_DIR = Path("/etc/apt")


@dataclass(frozen=True)
class Source:
    """One apt repository: a URI, its suites and components."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]

    def line(self) -> str:
        """The one-line form (`deb URI SUITE COMPONENTS`), one line per suite."""
        return "\n".join(f"deb {self.uri} {s} {' '.join(self.components)}" for s in self.suites)


def parse_deb822(text: str) -> list[Source]:
    """`Types: deb` stanzas of a `.sources` file (comments and `deb-src` left out)."""
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for ln in stanza.splitlines():
            if ln.startswith("#") or ":" not in ln or ln[:1].isspace():
                continue
            key, _, value = ln.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(Source(uri.rstrip("/"), tuple(fields.get("suites", "").split()),
                              tuple(fields.get("components", "").split())))
    return out


def parse_one_line(text: str) -> list[Source]:
    """`deb [options] URI SUITE COMPONENT...` lines."""
    out = []
    for ln in text.splitlines():
        words = ln.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            out.append(Source(words[0].rstrip("/"), (words[1],), tuple(words[2:])))
    return out


def machine_sources(apt_dir: Path = APT_DIR) -> list[Source]:
    out = []
    for f in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]:
        if f.is_file():
            out += parse_one_line(f.read_text())
    for f in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        out += parse_deb822(f.read_text())
    return out


def debian(suite: str, sources: list[Source]) -> list[Source]:
    """The repositories of Debian release `suite` (and its -updates, -security, ...)."""
    return [s for s in sources if any(x == suite or x.startswith(suite + "-") for x in s.suites)]


def debian_mirror(suite: str = "bookworm", apt_dir: Path = APT_DIR) -> str:
    """The URI that serves `suite` itself with `main` (what debootstrap needs)."""
    for s in debian(suite, machine_sources(apt_dir)):
        if suite in s.suites and "main" in s.components:
            return s.uri
    raise RuntimeError(f"no apt source of this machine serves {suite} main "
                       f"(looked in {apt_dir}/sources.list and sources.list.d)")
