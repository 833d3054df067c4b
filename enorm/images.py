"""Turn an image recipe (images/<distro>/recipe.toml) into a base container.

Every edge server is an overlay snapshot clone of its base, so the expensive part
(debootstrap: about a minute natively, two or more under qemu-user) happens once per
board and is cached under /var/cache/enorm; building again reuses the cache and the base.

Names. An image is a recipe and a Debian architecture. Its base container is
`enorm-base-<recipe>` for the host's own architecture (the node config's `image =
"debian"`) and `enorm-base-<recipe>-<arch>` for another (`image = "debian-arm64"`, or
`enorm image build debian --arch arm64`); `debian-<the host's arch>` is the plain one.
A foreign architecture runs through qemu-user registered with binfmt_misc (the F flag:
its binaries run in containers that do not hold the emulator).

Stages of a debootstrap recipe:
1. the rootfs, cached as <distro>-<suite>-<arch>-<key>, the key a digest of what decides
   its contents (suite, variant, packages): built into a .tmp, renamed when complete,
   older keys of the same distro, suite and arch removed. The packages come from the
   Debian archive of the machine's apt sources (`enorm.mirrors`) unless overridden;
2. the base container's rootfs: a copy with enorm's init, sshd and Redis settings
   (`_customise`), made beside the live one and swapped in by one atomic rename, so that a
   clone being made sees the old or the new, never none. The replaced rootfs is kept
   while a container started before the swap runs (its overlay reads it) and removed by a
   later build;
3. the LXC config and a record of what was built (`enorm-image.json`), beside it. A
   base whose record names another key (or none: built before records) is rebuilt.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from enorm import mirrors, sizing

IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"
CACHE_DIR = Path(os.environ.get("ENORM_IMAGE_CACHE", "/var/cache/enorm/images"))
BINFMT = Path("/proc/sys/fs/binfmt_misc")

Progress = Callable[[str], None]
# Bump when _customise changes: existing base containers are customised again.
REVISION = "3"
MARKER = "etc/enorm-image-revision"
RECORD = "enorm-image.json"
OLD_ROOTFS = "rootfs.old."  # + the time it was swapped out

# Debian architecture -> the binfmt_misc entry of its qemu-user emulator.
QEMU = {"amd64": "qemu-x86_64", "arm64": "qemu-aarch64", "armhf": "qemu-arm",
        "armel": "qemu-arm", "i386": "qemu-i386"}  # fmt: skip
# What a CPU (uname -m) runs without an emulator, by Debian architecture.
NATIVE = {"x86_64": {"amd64", "i386"}, "aarch64": {"arm64", "armhf", "armel"},
          "armv7l": {"armhf", "armel"}, "armv6l": {"armel"}}  # fmt: skip


class ImageError(RuntimeError):
    """The image cannot be built; the message says which step and why."""


def recipes() -> list[str]:
    return sorted(p.parent.name for p in IMAGES_DIR.glob("*/recipe.toml"))


@functools.cache
def load_recipe(name: str) -> dict:
    path = IMAGES_DIR / name / "recipe.toml"
    if not path.exists():
        raise ImageError(f"image: no recipe {name!r} (known: {', '.join(recipes())})")
    return tomllib.loads(path.read_text())


def recipe_arch(recipe: dict, machine: str | None = None) -> str:
    """The recipe's (Debian) name of this machine's architecture."""
    machine = machine or platform.machine()
    try:
        return recipe["arch"][machine]
    except KeyError:
        raise ImageError(
            f"image: recipe {recipe['distro']!r} has no architecture for {machine!r}"
        ) from None


@dataclass(frozen=True)
class Image:
    """A recipe for one architecture, and the name of its base container."""

    recipe: str
    arch: str
    container: str
    data: dict = field(compare=False, repr=False)


def resolve(name: str, arch: str | None = None, machine: str | None = None) -> Image:
    """`debian`, `debian-arm64`, or `debian` with `arch="arm64"` -> the image; `machine`
    (uname -m, this one's by default) decides which architecture is the plain name."""
    machine = machine or platform.machine()
    known = recipes()
    recipe_name, named = name, None
    if name not in known:
        head, _, tail = name.rpartition("-")
        if head not in known:
            raise ImageError(f"image {name!r}: no such recipe (known: {', '.join(known)}; "
                             f"RECIPE-ARCH names another architecture, e.g. debian-arm64)")
        recipe_name, named = head, tail
    recipe = load_recipe(recipe_name)
    arches = sorted(set(recipe["arch"].values()))
    if named and arch and named != arch:
        raise ImageError(f"image {name!r} is for {named}, not --arch {arch}")
    want = arch or named
    host = recipe["arch"].get(machine)
    if want is None:
        want = recipe_arch(recipe, machine)
    elif want not in arches:
        raise ImageError(f"image {name!r}: recipe {recipe_name} has no architecture "
                         f"{want!r} (known: {', '.join(arches)})")
    plain = f"enorm-base-{recipe_name}"
    return Image(recipe_name, want, plain if want == host else f"{plain}-{want}", recipe)


def cache_key(recipe: dict, arch: str) -> str:
    """A digest of what decides a debootstrap rootfs's contents (not the mirror: every
    Debian mirror serves the same packages)."""
    ident = {"distro": recipe["distro"], "suite": recipe["suite"], "arch": arch,
             "variant": recipe["variant"], "packages": sorted(recipe["packages"])}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def native(arch: str, machine: str | None = None) -> bool:
    """Whether this machine's CPU runs `arch` binaries without an emulator."""
    return arch in NATIVE.get(machine or platform.machine(), set())


def emulation_problem(arch: str, machine: str | None = None,
                      binfmt: Path = BINFMT) -> str | None:  # fmt: skip
    """Why binaries of `arch` cannot run on this machine, with the fix; None if they can."""
    machine = machine or platform.machine()
    if native(arch, machine):
        return None
    entry = QEMU.get(arch)
    if entry is None:
        return f"{arch} binaries cannot run on this {machine} machine (no emulator known)"
    fix = (f"install qemu-user-static and binfmt-support, `mount -t binfmt_misc binfmt_misc "
           f"{binfmt}` if it is not mounted, then `update-binfmts --enable {entry}` (the "
           f"project's `scripts/setup.sh --foreign {arch}` and the Ansible role's "
           f"binfmt tasks do this)")
    if not (binfmt / "status").exists():
        return f"{arch} binaries cannot run here: binfmt_misc is not mounted; {fix}"
    try:
        lines = (binfmt / entry).read_text().splitlines()
    except OSError:
        return f"{arch} binaries cannot run here: no binfmt_misc entry {entry}; {fix}"
    if not lines or lines[0] != "enabled":
        return f"{arch} binaries cannot run here: binfmt_misc entry {entry} is disabled; {fix}"
    flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags:")), "")
    if "F" not in flags:
        return (f"binfmt_misc entry {entry} lacks the F flag: {arch} binaries would not "
                f"run inside containers; register it again with qemu-user-static's "
                f"--fix-binary entry (`update-binfmts --disable {entry}; update-binfmts "
                f"--enable {entry}` with qemu-user-static installed)")
    return None


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One builder at a time per cache entry or base container (two `make setup`s)."""
    locks = CACHE_DIR / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


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


def _cached_rootfs(recipe: dict, arch: str) -> tuple[str, Path]:
    """The cache entry's stem (its lock) and the rootfs of this recipe's package list."""
    stem = f"{recipe['distro']}-{recipe['suite']}-{arch}"
    return stem, CACHE_DIR / f"{stem}-{cache_key(recipe, arch)}"


def _debootstrap(recipe: dict, arch: str, mirror: str | None, progress: Progress) -> Path:
    """Build (or reuse) the cached rootfs for this recipe, architecture and package list."""
    stem, rootfs = _cached_rootfs(recipe, arch)
    with _locked(stem):
        if (rootfs / "usr/bin/python3").exists():
            progress(f"rootfs: reusing {rootfs}")
            return rootfs
        if shutil.which("debootstrap") is None:
            raise ImageError("image: debootstrap is not installed (apt-get install debootstrap)")
        problem = emulation_problem(arch)
        if problem:
            raise ImageError(f"image: {problem}")
        try:
            url = mirrors.debian_mirror(recipe["suite"], override=mirror or recipe.get("mirror"))
        except mirrors.MirrorError as exc:
            raise ImageError(f"image: {exc}") from None
        tmp = rootfs.with_name(rootfs.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        progress(f"rootfs: debootstrap {recipe['suite']} {arch} from {url}")
        _run(
            [
                "debootstrap",
                f"--variant={recipe['variant']}",
                f"--arch={arch}",
                "--include=" + ",".join(recipe["packages"]),
                recipe["suite"],
                str(tmp),
                url,
            ],
            progress,
            "debootstrap",
        )
        tmp.rename(rootfs)  # only a complete rootfs gets the final name
        # The same distro, suite and arch under another key (or none, before keys):
        # another package list, never used again.
        for stale in CACHE_DIR.glob(f"{stem}*"):
            if stale != rootfs and stale.name[len(stem):len(stem) + 1] in ("", "-"):
                progress(f"rootfs: removing the stale {stale}")
                shutil.rmtree(stale, ignore_errors=True)
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
    """The LXC config of the base container; clones add network, limits and name.
    `lxc.arch` takes the Debian names (LXC 5 starts an arm64 container on an amd64 host
    with `arm64` as with `aarch64`; the emulation is binfmt_misc's, not LXC's)."""
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


def record(lxc_path: Path, container: str) -> dict:
    """What `build` wrote beside a base container ({} if nothing, or unreadable)."""
    try:
        return json.loads((lxc_path / container / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _started_since(lxc_path: Path) -> float:
    """When the longest-running container under `lxc_path` started (inf: none runs):
    a rootfs swapped out after that may still be read by an overlay."""
    import lxc  # only here: the rest of the image builder runs without the bindings

    oldest = float("inf")
    for c in lxc.list_containers(active=True, defined=False, config_path=str(lxc_path),
                                 as_object=True):  # fmt: skip
        with contextlib.suppress(psutil.Error, ValueError):
            oldest = min(oldest, psutil.Process(c.init_pid).create_time())
    return oldest


def _remove_old_rootfs(cdir: Path, lxc_path: Path, progress: Progress) -> None:
    """Remove the swapped-out rootfs versions that no running container can be using."""
    old = sorted(cdir.glob(OLD_ROOTFS + "*"))
    if not old:
        return
    oldest = _started_since(lxc_path)
    for path in old:
        swapped = float(path.name[len(OLD_ROOTFS):].split("-")[0] or 0)
        if swapped < oldest:
            progress(f"base container: removing the replaced {path.name}")
            shutil.rmtree(path, ignore_errors=True)


def _swap_in(cdir: Path, new: Path) -> None:
    """Make `new` the base's rootfs in one step; the replaced one becomes rootfs.old.*."""
    live = cdir / "rootfs"
    aside = cdir / f"{OLD_ROOTFS}{time.time():.3f}-{os.getpid()}"
    if not live.exists():
        new.rename(live)
        return
    try:
        _exchange(new, live)
    except OSError:  # a file system without RENAME_EXCHANGE: two renames
        live.rename(aside)
        new.rename(live)
    else:
        new.rename(aside)


def build(
    name: str,
    *,
    arch: str | None = None,
    mirror: str | None = None,
    lxc_path: Path = Path("/var/lib/lxc"),
    progress: Progress = print,
    rebuild: bool = False,
) -> str:
    """Build the base container of image `name` (for `arch`, the host's by default);
    returns its name. `mirror` overrides the recipe's and the apt sources' archive."""
    image = resolve(name, arch)
    recipe, container = image.data, image.container
    if recipe["method"] not in ("debootstrap", "download"):
        raise ImageError(f"image: recipe {image.recipe!r} has unknown method "
                         f"{recipe['method']!r}")
    cdir = lxc_path / container
    key = cache_key(recipe, image.arch) if recipe["method"] == "debootstrap" else None
    with _locked(container):
        if (cdir / "config").exists() and not rebuild and (
                key is None or record(lxc_path, container).get("key") == key):
            marker = cdir / "rootfs" / MARKER
            if marker.exists() and marker.read_text().strip() == REVISION:
                progress(f"base container {container}: already built, reusing it")
            else:
                _customise(cdir / "rootfs")
                sizing.path(lxc_path, container).unlink(missing_ok=True)  # measure again
                progress(f"base container {container}: updated to revision {REVISION}")
            _remove_old_rootfs(cdir, lxc_path, progress)
            return container
        if key is None:
            _download(image, lxc_path, progress)
        else:
            cached = _debootstrap(recipe, image.arch, mirror, progress)
            new = cdir / "rootfs.new"
            shutil.rmtree(new, ignore_errors=True)
            cdir.mkdir(parents=True, exist_ok=True)
            progress(f"rootfs: copying {cached} -> {new}")
            _run(["cp", "-a", str(cached), str(new)], progress, "copy rootfs")
            _customise(new)
            _write(cdir / "config", base_config(container, cdir / "rootfs", image.arch))
            _swap_in(cdir, new)
            _write(cdir / RECORD, json.dumps({
                "recipe": image.recipe, "arch": image.arch, "suite": recipe["suite"],
                "key": key, "packages": recipe["packages"], "rootfs": cached.name,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
            _remove_old_rootfs(cdir, lxc_path, progress)
        sizing.path(lxc_path, container).unlink(missing_ok=True)  # measure it again
        progress(f"base container {container}: ready")
        return container


def _download(image: Image, lxc_path: Path, progress: Progress) -> None:
    """A recipe of LXC's download template (boards that reach the distro's mirrors)."""
    recipe, container = image.data, image.container
    shutil.rmtree(lxc_path / container, ignore_errors=True)
    _run(
        [
            "lxc-create", "-P", str(lxc_path), "-n", container, "-t", "download", "--",
            "-d", recipe["distro"], "-r", recipe["release"], "-a", image.arch,
        ],
        progress,
        "lxc-create (download template)",
    )
    rootfs = lxc_path / container / "rootfs"
    _run(["chroot", str(rootfs), "apk", "add", "--no-cache", *recipe["packages"]], progress,
         "apk add")
    _customise(rootfs)


# ELF e_machine of each Debian architecture (a rootfs's python3 tells what it was built for).
ELF_MACHINE = {"amd64": 62, "arm64": 183, "armhf": 40, "armel": 40, "i386": 3}


def elf_machine(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def import_rootfs(name: str, tarball: Path, *, lxc_path: Path = Path("/var/lib/lxc"),
                  progress: Progress = print) -> str:
    """A debootstrap rootfs of recipe `name` built elsewhere (on a controller, for this
    board's architecture) and tarred: it becomes this machine's cached rootfs, as if
    debootstrap had run here, and the base container is built from it. Build once, push
    to many boards; a rootfs of another architecture is refused before anything is
    replaced."""
    image = resolve(name)  # this board's own architecture
    recipe, arch = image.data, image.arch
    if recipe["method"] != "debootstrap":
        raise ImageError(f"image: recipe {image.recipe!r} is not built with debootstrap")
    stem, rootfs = _cached_rootfs(recipe, arch)
    tmp = rootfs.with_name(rootfs.name + ".import")
    with _locked(stem):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _run(["tar", "-xpf", str(tarball), "--numeric-owner", "-C", str(tmp)], progress,
                 "unpack rootfs")
            link = tmp / "usr/bin/python3"
            target = os.readlink(link) if link.is_symlink() else link.name
            found = elf_machine(tmp / target.lstrip("/") if target.startswith("/")
                                else link.parent / target)  # never a file of this host
            if found != ELF_MACHINE.get(arch):
                got = next((a for a, m in ELF_MACHINE.items() if m == found), "no python3")
                raise ImageError(f"image: {tarball} holds a {got} rootfs; "
                                 f"this board needs {arch}")
            shutil.rmtree(rootfs, ignore_errors=True)
            tmp.rename(rootfs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"rootfs: imported {tarball} as {rootfs}")
    return build(name, lxc_path=lxc_path, progress=progress)
