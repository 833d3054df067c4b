"""`enorm image import`: a rootfs tarball made on a controller becomes the board's image."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

from enorm import images

HOST = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
OTHER = "arm64" if HOST == "amd64" else "amd64"


def fake_rootfs(tmp_path: Path, arch: str) -> Path:
    """A tarball whose python3 (a relative link, as Debian's) is an ELF of `arch`."""
    root = tmp_path / f"root-{arch}"
    (root / "usr/bin").mkdir(parents=True)
    head = bytearray(b"\x7fELF\x02\x01\x01" + bytes(13))
    head[18:20] = images.ELF_MACHINE[arch].to_bytes(2, "little")
    (root / "usr/bin/python3.11").write_bytes(bytes(head) + bytes(64))
    os.symlink("python3.11", root / "usr/bin/python3")
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("from the controller")
    tar = tmp_path / f"rootfs-{arch}.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    return tar


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setattr(images, "CACHE_DIR", d)
    return d


def test_a_rootfs_of_the_boards_architecture_becomes_its_base(tmp_path, cache) -> None:
    lxc_path = tmp_path / "lxc"
    name = images.import_rootfs("debian", fake_rootfs(tmp_path, HOST), lxc_path=lxc_path,
                                progress=lambda _: None)
    assert name == "enorm-base-debian"
    rootfs = lxc_path / name / "rootfs"
    assert (rootfs / "usr/bin/python3").is_symlink()
    assert (rootfs / images.MARKER).read_text().strip() == images.REVISION
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*"))  # each container makes its own
    assert f"lxc.arch = {HOST}" in (lxc_path / name / "config").read_text()
    _, cached = images._cached_rootfs(images.load_recipe("debian"), HOST)
    assert cached.parent == cache and (cached / "usr/bin/python3.11").exists()


def test_a_rootfs_of_another_architecture_is_refused_and_nothing_replaced(tmp_path,
                                                                         cache) -> None:
    _, kept = images._cached_rootfs(images.load_recipe("debian"), HOST)
    (kept / "usr/bin").mkdir(parents=True)
    (kept / "usr/bin/python3").write_text("the board's own")
    with pytest.raises(images.ImageError, match=f"holds a {OTHER} rootfs; this board needs "
                                                 f"{HOST}"):
        images.import_rootfs("debian", fake_rootfs(tmp_path, OTHER),
                             lxc_path=tmp_path / "lxc", progress=lambda _: None)
    assert (kept / "usr/bin/python3").read_text() == "the board's own"
    assert sorted(p.name for p in cache.iterdir() if p.name != "locks") == [kept.name]
    assert not (tmp_path / "lxc/enorm-base-debian").exists()
