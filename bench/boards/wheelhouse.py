"""The project's Python dependencies for a board's platform, as files the playbook copies.

A board of the lab reaches no package index: the playbook copies this directory in and
installs with `pip install --no-index --find-links` (role variable
`enorm_pip_wheelhouse`). It is made on the host with the host's own pip configuration
(index, extra indexes, find-links, constraints: where packages come from on this
machine): the dependency set is resolved once on the host (`pip install --dry-run
--report`, by Debian 12's own python3, so that markers evaluate as on the board), then
each pinned package is fetched for the board's platform, a binary wheel where one exists
(`--platform`, `--prefer-binary`)
and the source distribution otherwise (built on the board: python3-lxc against lxc-dev).
The build backend of the project and of the source distributions comes along. Cached per
architecture and dependency set.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

CACHE = Path("/var/cache/enorm/boards/wheelhouse")
# Debian 12: CPython 3.11, glibc 2.36.
PYTHON = "3.11"
GLIBC = (2, 36)
MACHINE = {"arm64": "aarch64", "amd64": "x86_64", "armhf": "armv7l"}
# What building the project and the source distributions needs (pyproject.toml).
BUILD = ["setuptools>=68", "wheel"]


def platforms(arch: str) -> list[str]:
    """The wheel platform tags a Debian 12 board of `arch` accepts, newest first."""
    m = MACHINE[arch]
    tags = [f"manylinux_2_{minor}_{m}" for minor in range(GLIBC[1], 16, -1)]
    tags += [f"manylinux2014_{m}"] if m in ("x86_64", "aarch64", "armv7l") else []
    return tags + [f"linux_{m}"]


def pins(report: dict, project: str = "enorm") -> list[str]:
    """`name==version` of every package pip would install, the project itself left out
    (it goes as source)."""
    out = []
    for item in report.get("install", []):
        meta = item["metadata"]
        if meta["name"].lower() != project:
            out.append(f"{meta['name']}=={meta['version']}")
    return sorted(out, key=str.lower)


def board_python(cache: Path = CACHE) -> str:
    """An interpreter that evaluates markers as the board's does: a venv of this Debian
    12 machine's own python3 (3.11.2, as on the boards; the project's venv may be
    another 3.11: `python_full_version < "3.11.3"` pulls async-timeout in for redis on
    the board and not here)."""
    venv = cache / "resolver-venv"
    if not (venv / "bin/python").exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    return str(venv / "bin/python")


def resolve(wants: list[str], python: str) -> list[str]:
    """`wants` (requirements or the project's directory) with everything they need,
    pinned, as the host's pip resolves them."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--dry-run",
                        "--ignore-installed", "--report", f.name, *wants],
                       check=True, capture_output=True, text=True)
        return pins(json.loads(Path(f.name).read_text()))


def download_args(arch: str, dest: Path) -> list[str]:
    """pip download of pinned packages for the board: wheels for its platform where they
    exist, source distributions otherwise (allowed with `--no-deps`: the set is
    resolved already)."""
    plat = [a for t in platforms(arch) for a in ("--platform", t)]
    return ["download", "--quiet", "--no-deps", "--prefer-binary", "--dest", str(dest),
            "--python-version", PYTHON, "--implementation", "cp", *plat]


def build(arch: str, source_dir: Path, cache: Path = CACHE) -> Path:
    """The wheelhouse of `arch` for the project at `source_dir` (cached by its pins)."""
    python = board_python(cache)
    # The build backend goes with its own dependencies (wheel needs packaging): on the
    # board pip builds in an isolated environment from these files alone.
    wanted = sorted(set(resolve([str(source_dir)], python) + resolve(BUILD, python)),
                    key=str.lower)
    key = hashlib.sha256("\n".join([arch, *wanted]).encode()).hexdigest()[:12]
    dest = cache / f"{arch}-{key}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    tmp.mkdir(parents=True)
    p = subprocess.run([python, "-m", "pip", *download_args(arch, tmp), *wanted],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"wheelhouse {arch}: pip download failed:\n{p.stderr[-3000:]}")
    (tmp / "requirements.txt").write_text("\n".join(wanted) + "\n")
    (tmp / ".complete").write_text("")
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    tmp.rename(dest)
    for old in cache.glob(f"{arch}-*"):  # earlier dependency sets of this architecture
        if old != dest:
            subprocess.run(["rm", "-rf", str(old)], check=True)
    return dest
