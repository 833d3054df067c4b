"""Turn an image recipe (images/<distro>/recipe.toml) into the base container.

Every edge server is an overlay snapshot clone of this base, so the expensive part
(debootstrap, about a minute) happens once per board and is cached under
/var/cache/enorm; building again reuses the cache and an existing base container.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

from enorm import sizing

IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"
CACHE_DIR = Path(os.environ.get("ENORM_IMAGE_CACHE", "/var/cache/enorm/images"))

Progress = Callable[[str], None]
# Bump when _customise changes: existing base containers are customised again.
REVISION = "2"
MARKER = "etc/enorm-image-revision"


class ImageError(RuntimeError):
    """The image cannot be built; the message says which step and why."""


def recipes() -> list[str]:
    return sorted(p.parent.name for p in IMAGES_DIR.glob("*/recipe.toml"))


def load_recipe(name: str) -> dict:
    path = IMAGES_DIR / name / "recipe.toml"
    if not path.exists():
        raise ImageError(f"image: no recipe {name!r} (known: {', '.join(recipes())})")
    return tomllib.loads(path.read_text())


def recipe_arch(recipe: dict, machine: str | None = None) -> str:
    machine = machine or platform.machine()
    try:
        return recipe["arch"][machine]
    except KeyError:
        raise ImageError(
            f"image: recipe {recipe['distro']!r} has no architecture for {machine!r}"
        ) from None


def _run(cmd: list[str], progress: Progress, step: str) -> None:
    progress(f"{step}: {' '.join(cmd[:3])} ...")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line.startswith(("I: Retrieving", "I: Validating")):
            continue  # one line per package: too chatty
        progress(f"  {line}")
    if proc.wait() != 0:
        raise ImageError(f"image: {step} failed:\n" + "\n".join(tail))


def _debootstrap(recipe: dict, arch: str, progress: Progress) -> Path:
    """Build (or reuse) the cached rootfs for this recipe and architecture."""
    rootfs = CACHE_DIR / f"{recipe['distro']}-{recipe['suite']}-{arch}"
    if (rootfs / "usr/bin/python3").exists():
        progress(f"rootfs: reusing {rootfs}")
        return rootfs
    if shutil.which("debootstrap") is None:
        raise ImageError("image: debootstrap is not installed (apt-get install debootstrap)")
    tmp = rootfs.with_name(rootfs.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "debootstrap",
            f"--variant={recipe['variant']}",
            f"--arch={arch}",
            "--include=" + ",".join(recipe["packages"]),
            recipe["suite"],
            str(tmp),
            recipe["mirror"],
        ],
        progress,
        "debootstrap",
    )
    tmp.rename(rootfs)  # only a complete rootfs gets the final name
    return rootfs


def _customise(rootfs: Path) -> None:
    """Install enorm's init, sshd and Redis settings into the base rootfs."""
    common = IMAGES_DIR / "common"
    installs = {
        "init.sh": ("usr/local/sbin/enorm-init", 0o755),
        "enorm-app": ("usr/local/bin/enorm-app", 0o755),
        "sshd_config": ("etc/ssh/sshd_config", 0o644),
        "redis.conf": ("etc/redis/enorm.conf", 0o644),
    }
    for src, (dst, mode) in installs.items():
        target = rootfs / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(common / src, target)
        target.chmod(mode)
    (rootfs / "etc/redis/enorm-auth.conf").write_text("")
    # Each container makes its own host key at first start (see init.sh).
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    ssh = rootfs / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (rootfs / "etc/hostname").write_text("enorm\n")
    # No resolver inside: tenants start nothing outside the host, and a name lookup
    # must fail at once instead of waiting for an unreachable DNS server.
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    (rootfs / "etc/resolv.conf").write_text("# enorm: no DNS inside edge servers\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    (rootfs / MARKER).write_text(REVISION + "\n")


def base_config(name: str, rootfs: Path, arch: str) -> str:
    """The LXC config of the base container; clones add network, limits and name."""
    return "\n".join(
        [
            "lxc.include = /usr/share/lxc/config/common.conf",
            f"lxc.arch = {arch}",
            f"lxc.rootfs.path = dir:{rootfs}",
            f"lxc.uts.name = {name}",
            "lxc.init.cmd = /usr/local/sbin/enorm-init",
            "lxc.mount.auto = proc:mixed sys:mixed cgroup:mixed",
            "lxc.tty.max = 0",
            "lxc.pty.max = 64",
            "lxc.net.0.type = empty",
            "lxc.signal.halt = SIGTERM",
            "",
        ]
    )


def build(
    name: str,
    *,
    lxc_path: Path = Path("/var/lib/lxc"),
    progress: Progress = print,
    rebuild: bool = False,
) -> str:
    """Build the base container `enorm-base-<name>` from its recipe; returns its name."""
    recipe = load_recipe(name)
    container = f"enorm-base-{name}"
    cdir = lxc_path / container
    if (cdir / "config").exists() and not rebuild:
        rootfs = cdir / "rootfs"
        if (rootfs / MARKER).exists() and (rootfs / MARKER).read_text().strip() == REVISION:
            progress(f"base container {container}: already built, reusing it")
        else:
            _customise(rootfs)
            sizing.path(lxc_path, container).unlink(missing_ok=True)  # measure it again
            progress(f"base container {container}: updated to revision {REVISION}")
        return container
    arch = recipe_arch(recipe)
    if recipe["method"] == "download":
        _run(
            [
                "lxc-create", "-P", str(lxc_path), "-n", container, "-t", "download", "--",
                "-d", recipe["distro"], "-r", recipe["release"], "-a", arch,
            ],
            progress,
            "lxc-create (download template)",
        )
        rootfs = cdir / "rootfs"
        _run(
            ["chroot", str(rootfs), "apk", "add", "--no-cache", *recipe["packages"]],
            progress,
            "apk add",
        )
    elif recipe["method"] == "debootstrap":
        cached = _debootstrap(recipe, arch, progress)
        shutil.rmtree(cdir, ignore_errors=True)
        rootfs = cdir / "rootfs"
        cdir.mkdir(parents=True)
        progress(f"rootfs: copying {cached} -> {rootfs}")
        _run(["cp", "-a", str(cached), str(rootfs)], progress, "copy rootfs")
    else:
        raise ImageError(f"image: recipe {name!r} has unknown method {recipe['method']!r}")
    _customise(rootfs)
    sizing.path(lxc_path, container).unlink(missing_ok=True)
    (cdir / "config").write_text(base_config(container, rootfs, arch))
    progress(f"base container {container}: ready")
    return container
