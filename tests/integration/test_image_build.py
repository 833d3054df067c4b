"""`enorm image build` on the real CLI, file system and apt sources, with a stand-in for
debootstrap (a real one takes a minute natively, minutes emulated: the e2e arm64 test runs
that). The cache keyed by package list, the atomic swap of a rebuilt base under running
containers, the mirror taken from this machine's apt sources, and a failed build that
leaves the old base as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enorm import images, mirrors

BIN = Path(sys.executable).parent
FAKE_DEBOOTSTRAP = """#!/usr/bin/env python3
import json, os, pathlib, sys
target = pathlib.Path(sys.argv[-2])
if os.environ.get("FAKE_DEBOOTSTRAP_FAIL"):  # half-way, as a real one stops
    (target / "var/cache/apt").mkdir(parents=True)
    print("E: Couldn't download packages: python3-waitress"); sys.exit(1)
(target / "usr/bin").mkdir(parents=True)
(target / "usr/bin/python3").write_text("python3")
(target / "etc/ssh").mkdir(parents=True)
(target / "etc/ssh/ssh_host_rsa_key").write_text("the build machine's key")
(target / "args.json").write_text(json.dumps(sys.argv[1:]))
"""


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """A cache and an LXC path of the test's own, debootstrap on PATH replaced."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "debootstrap"
    fake.write_text(FAKE_DEBOOTSTRAP)
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "ENORM_IMAGE_CACHE": str(tmp_path / "cache")}  # fmt: skip
    env.pop(mirrors.ENV, None)
    return {"env": env, "cache": tmp_path / "cache", "lxc": tmp_path / "lxc"}


def build(world: dict, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "enorm"), "image", "build", *args,
                           "--lxc-path", str(world["lxc"])],
                          capture_output=True, text=True, timeout=120,
                          env={**world["env"], **env})  # fmt: skip


def test_build_reuse_and_the_mirror_of_the_apt_sources(world: dict) -> None:
    r = build(world, "debian", "--arch", "arm64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "enorm-base-debian-arm64 ready"
    base = world["lxc"] / "enorm-base-debian-arm64"
    key = images.cache_key(images.load_recipe("debian"), "arm64")
    cached = world["cache"] / f"debian-bookworm-arm64-{key}"
    args = json.loads((cached / "args.json").read_text())
    recipe = images.load_recipe("debian")
    assert args == ["--variant=minbase", "--arch=arm64",
                    "--include=" + ",".join(recipe["packages"]), "bookworm",
                    str(cached.with_name(cached.name + ".tmp")),
                    mirrors.debian_mirror("bookworm")]  # fmt: skip
    assert not cached.with_name(cached.name + ".tmp").exists()
    config = (base / "config").read_text()
    assert "lxc.arch = arm64\n" in config and f"lxc.rootfs.path = dir:{base}/rootfs\n" in config
    assert json.loads((base / images.RECORD).read_text())["key"] == key
    rootfs = base / "rootfs"
    assert (rootfs / images.MARKER).read_text() == images.REVISION + "\n"
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*"))  # each container makes its own
    assert (rootfs / "usr/local/sbin/enorm-init").stat().st_mode & 0o111

    # again: nothing rebuilt, in well under a second of work
    t0 = time.monotonic()
    again = build(world, "debian-arm64")
    assert again.returncode == 0 and "already built, reusing it" in again.stderr
    assert time.monotonic() - t0 < 10
    assert "debootstrap" not in again.stderr

    # the operator's mirror wins over the apt sources
    r = build(world, "debian", "--arch", "armhf", **{mirrors.ENV: "http://10.0.0.1/debian/"})
    assert r.returncode == 0, r.stderr
    armhf = world["cache"] / f"debian-bookworm-armhf-{images.cache_key(recipe, 'armhf')}"
    assert json.loads((armhf / "args.json").read_text())[-1] == "http://10.0.0.1/debian"


def test_bad_names_exit_2_naming_what(world: dict) -> None:
    for args, message in [(["debian", "--arch", "sparc"], "no architecture 'sparc'"),
                          (["debian-arm64", "--arch", "armhf"], "is for arm64, not --arch armhf"),
                          (["nosuch"], "no such recipe"),
                          (["debian", "--mirror", "deb.example/x"], "--mirror: 'deb.example/x'")]:
        r = build(world, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr
    assert not world["lxc"].exists()  # nothing started


def test_a_failed_build_leaves_the_base_as_it_was(world: dict) -> None:
    assert build(world, "debian").returncode == 0
    base = world["lxc"] / images.resolve("debian").container
    before = (base / "config").read_text(), (base / images.RECORD).read_text()
    subprocess.run(["rm", "-rf", str(world["cache"])], check=True)  # the cache is gone
    r = build(world, "debian", "--rebuild", FAKE_DEBOOTSTRAP_FAIL="1")
    assert r.returncode == 1
    assert "debootstrap failed" in r.stderr and "Couldn't download packages" in r.stderr
    assert "Traceback" not in r.stderr
    assert ((base / "config").read_text(), (base / images.RECORD).read_text()) == before
    assert (base / "rootfs/usr/bin/python3").exists()
    assert [p.name.endswith(".tmp") for p in world["cache"].glob("debian-*")] == [True]
    # the next build starts the .tmp afresh and completes
    assert build(world, "debian", "--rebuild").returncode == 0
    assert not list(world["cache"].glob("debian-*.tmp"))


def test_a_changed_package_list_is_swapped_in_and_the_old_kept_while_used(
        world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """In-process: a running container started before the swap keeps the old rootfs
    alive; once none is, the next build removes it. The stale cache goes at once."""
    monkeypatch.setenv("PATH", world["env"]["PATH"])
    monkeypatch.setattr(images, "CACHE_DIR", world["cache"])
    lxc_path, log = world["lxc"], []
    name = images.build("debian", lxc_path=lxc_path, progress=log.append)
    live = lxc_path / name / "rootfs"
    first = (live / "args.json").stat().st_ino
    old_key = json.loads((lxc_path / name / images.RECORD).read_text())["key"]

    recipe = dict(images.load_recipe("debian"))
    monkeypatch.setattr(images, "load_recipe",
                        lambda n: {**recipe, "packages": [*recipe["packages"], "strace"]})
    # a container runs since before the swap: its overlay may read the old rootfs
    monkeypatch.setattr(images, "_started_since", lambda p: time.time() - 60)
    images.build("debian", lxc_path=lxc_path, progress=log.append)
    record = json.loads((lxc_path / name / images.RECORD).read_text())
    assert record["key"] != old_key and "strace" in record["packages"]
    assert "--include=" in (live / "args.json").read_text()
    assert "strace" in (live / "args.json").read_text()
    old = list((lxc_path / name).glob(images.OLD_ROOTFS + "*"))
    assert len(old) == 1 and (old[0] / "args.json").stat().st_ino == first
    assert not (lxc_path / name / "rootfs.new").exists()
    # only the new key's cache is left
    assert [p.name for p in world["cache"].glob("debian-bookworm-*")] == [record["rootfs"]]

    # the container is gone: the next build (nothing to rebuild) removes the old rootfs
    monkeypatch.setattr(images, "_started_since", lambda p: float("inf"))
    images.build("debian", lxc_path=lxc_path, progress=log.append)
    assert not old[0].exists() and live.exists()
    assert any("removing the replaced" in line for line in log)
