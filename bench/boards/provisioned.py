"""The provisioned board disk, cached: what the playbook made of a fresh board.

`make boards` provisions every board from zero (that is what it tests); provisioning a
1 GB board under TCG takes 20-50 minutes, most of it dpkg and pip. Once a board's two
playbook runs have passed (from zero, then changed=0), the lab powers it off cleanly
and flattens its disk (the overlay and the base disk under it) into one qcow2 here.
`make boards-quick` boots an overlay of that instead of the fresh disk and runs the
playbook once more: it converges the project's current source and config onto a board
provisioned earlier, as an operator's upgrade does.

The cache is keyed by what it was built from and what a converging run cannot undo:

- the base disk (its recipe's digest: Debian release, kernel, packages, SSH key);
- the Debian packages the roles install (apt installs what is added, but never removes
  what a role no longer names);
- the Python dependencies' pins (the wheelhouse: pip does not remove a dependency
  dropped either);
- REVISION, the way the cache is made.

Everything else the roles do (files, units, config, the project's source, the base
image) the converging run applies again. The key is in the file's name, and a file gets
that name only once it is complete (written to a temporary name, synced, renamed), so a
disk under its key is valid; any other is stale and is replaced at the next save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.boards import at_nice

CACHE = Path("/var/cache/enorm/boards")
# Bump when the way the provisioned disk is made changes (what is saved, and when).
REVISION = 1
_VAR = re.compile(r"^\{\{\s*(\w+)\s*\}\}$")


def role_packages(roles: Path) -> list[str]:
    """Every Debian package an apt task of the roles names, sorted: a list written in the
    task, or one variable of a role's defaults (`name: "{{ lxc_packages }}"`); any other
    expression is kept as written, so that a change of it still changes the key."""
    defaults: dict = {}
    for f in sorted(roles.glob("*/defaults/main.yml")):
        defaults.update(yaml.safe_load(f.read_text()) or {})
    found: set[str] = set()

    def names(value: object) -> list[str]:
        if isinstance(value, str):
            m = _VAR.match(value.strip())
            if m and m.group(1) in defaults:
                return names(defaults[m.group(1)])
            return [value]
        return [str(v) for v in value] if isinstance(value, list) else []

    def walk(node: object) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for module in ("ansible.builtin.apt", "apt"):
                args = node.get(module)
                if isinstance(args, dict):
                    found.update(names(args.get("name", args.get("pkg", []))))
            for v in node.values():
                walk(v)

    for f in sorted(roles.glob("*/tasks/*.yml")):
        walk(yaml.safe_load(f.read_text()))
    return sorted(found)


def inputs(arch: str, disk_digest: str, packages: list[str], wheelhouse: Path) -> dict:
    """What a provisioned disk is built from (and its key is made of)."""
    return {"revision": REVISION, "arch": arch, "base_disk": disk_digest,
            "packages": sorted(packages), "python_pins": wheelhouse.name}


def key(built_from: dict) -> str:
    return hashlib.sha256(json.dumps(built_from, sort_keys=True).encode()).hexdigest()[:16]


def path(built_from: dict, cache: Path = CACHE) -> Path:
    return cache / built_from["arch"] / f"provisioned-{key(built_from)}.qcow2"


@dataclass(frozen=True)
class Lookup:
    """A valid provisioned disk for these inputs, or why there is none."""

    built_from: dict
    disk: Path | None
    why_not: str = ""


def find(built_from: dict, cache: Path = CACHE) -> Lookup:
    """The provisioned disk for `built_from` if one was saved; else why not, in words
    (none saved, or which of its inputs differ from the one saved last)."""
    p = path(built_from, cache)
    if p.exists():
        return Lookup(built_from, p)
    saved = sorted(p.parent.glob("provisioned-*.json"), key=lambda f: f.stat().st_mtime)
    if not saved:
        return Lookup(built_from, None, "none saved yet")
    try:
        old = json.loads(saved[-1].read_text()).get("built_from", {})
    except (OSError, ValueError):
        old = {}
    differ = [k for k in built_from if old.get(k) != built_from[k]]
    if "packages" in differ:
        gone = sorted(set(old.get("packages", [])) - set(built_from["packages"]))
        new = sorted(set(built_from["packages"]) - set(old.get("packages", [])))
        differ[differ.index("packages")] = ("packages (" + " ".join(
            [*(f"+{n}" for n in new), *(f"-{n}" for n in gone)]) + ")")
    words = {"base_disk": "the base disk", "python_pins": "the Python pins",
             "revision": "the cache's revision"}
    return Lookup(built_from, None, "the saved one was built from another "
                  + ", ".join(words.get(d, d) for d in differ or ["(unknown)"]))


def save(overlay: Path, built_from: dict, cache: Path = CACHE, **about: object) -> Path:
    """Flatten a powered-off board's disk (`overlay` and its backing chain) into the
    cache under its key: written under a temporary name, synced, then renamed; the
    disks of other keys are removed. The VM must be off (its QEMU exited): the guest
    unmounted its file system and QEMU closed the image, so what is read is complete."""
    dest = path(built_from, cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    for old in dest.parent.glob(".provisioned-*.tmp-*"):  # an interrupted save's
        old.unlink()
    try:
        flatten(overlay, tmp)
        _fsync(tmp)
        meta = dest.with_suffix(".json")
        meta.write_text(json.dumps({"built_from": built_from, "saved": time.strftime(
            "%Y-%m-%d %H:%M:%S"), "bytes": tmp.stat().st_size, **about}, indent=1) + "\n")
        tmp.rename(dest)
        _fsync(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for stale in dest.parent.glob("provisioned-*"):
        if stale.stem != dest.stem:
            stale.unlink()
    return dest


def flatten(overlay: Path, dest: Path) -> None:
    """One qcow2 with the overlay's data and its backing chain's: it needs no base disk."""
    subprocess.run([*at_nice(), "qemu-img", "convert", "-q", "-O", "qcow2", str(overlay),
                    str(dest)], check=True, capture_output=True, text=True)


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
