"""Image names, cache keys and the emulation check (enorm.images), and the node config's
`image` setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from enorm import config, images


@pytest.mark.parametrize("name, arch, machine, want", [
    ("debian", None, "x86_64", ("amd64", "enorm-base-debian")),
    ("debian", "amd64", "x86_64", ("amd64", "enorm-base-debian")),
    ("debian-amd64", None, "x86_64", ("amd64", "enorm-base-debian")),
    ("debian", "arm64", "x86_64", ("arm64", "enorm-base-debian-arm64")),
    ("debian-arm64", None, "x86_64", ("arm64", "enorm-base-debian-arm64")),
    ("debian-arm64", "arm64", "x86_64", ("arm64", "enorm-base-debian-arm64")),
    ("debian-armhf", None, "x86_64", ("armhf", "enorm-base-debian-armhf")),
    # on a Raspberry Pi 4 (arm64) the plain name is the arm64 image
    ("debian", None, "aarch64", ("arm64", "enorm-base-debian")),
    ("debian-arm64", None, "aarch64", ("arm64", "enorm-base-debian")),
    ("debian", "amd64", "aarch64", ("amd64", "enorm-base-debian-amd64")),
    ("debian", None, "armv7l", ("armhf", "enorm-base-debian")),
])  # fmt: skip
def test_the_host_architecture_keeps_the_plain_name(name, arch, machine, want) -> None:
    image = images.resolve(name, arch, machine=machine)
    assert (image.arch, image.container) == want
    assert image.recipe == "debian"


@pytest.mark.parametrize("name, arch, message", [
    ("debian", "mips", "recipe debian has no architecture 'mips' (known: amd64, arm64"),
    ("debian-mips", None, "recipe debian has no architecture 'mips'"),
    ("debian-arm64", "armhf", "image 'debian-arm64' is for arm64, not --arch armhf"),
    ("ubuntu", None, "image 'ubuntu': no such recipe (known: alpine, debian"),
    ("ubuntu-arm64", None, "no such recipe"),
])  # fmt: skip
def test_unknown_names_and_architectures_are_refused(name, arch, message) -> None:
    with pytest.raises(images.ImageError, match=message.replace("(", r"\(")):
        images.resolve(name, arch, machine="x86_64")


def test_a_machine_the_recipe_does_not_know_needs_an_arch() -> None:
    with pytest.raises(images.ImageError, match="no architecture for 'riscv64'"):
        images.resolve("debian", machine="riscv64")
    assert images.resolve("debian", "arm64", machine="riscv64").container == \
        "enorm-base-debian-arm64"


def test_the_cache_key_follows_the_package_list_and_the_arch() -> None:
    recipe = dict(images.load_recipe("debian"))
    key = images.cache_key(recipe, "amd64")
    assert key != images.cache_key(recipe, "arm64")
    assert key == images.cache_key({**recipe, "packages": recipe["packages"][::-1]}, "amd64")
    more = {**recipe, "packages": [*recipe["packages"], "strace"]}
    assert key != images.cache_key(more, "amd64")
    assert key != images.cache_key({**recipe, "suite": "trixie"}, "amd64")
    # the archive is not part of what was built
    assert key == images.cache_key({**recipe, "mirror": "http://other.example/debian"}, "amd64")


def test_the_debian_image_brings_its_servers_libraries() -> None:
    """A partitioned server runs with no pip: Flask, redis-py and a production WSGI
    server come with the image."""
    assert {"python3-flask", "python3-redis", "python3-waitress"} <= set(
        images.load_recipe("debian")["packages"])
    assert "mirror" not in images.load_recipe("debian")  # the machine's apt sources decide


def binfmt(tmp_path: Path, entries: dict[str, str]) -> Path:
    d = tmp_path / "binfmt_misc"
    d.mkdir()
    (d / "status").write_text("enabled\n")
    for name, text in entries.items():
        (d / name).write_text(text)
    return d


AARCH64 = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n"


def test_a_foreign_architecture_needs_its_emulator_registered(tmp_path: Path) -> None:
    ok = binfmt(tmp_path, {"qemu-aarch64": AARCH64})
    assert images.emulation_problem("arm64", "x86_64", ok) is None
    assert images.emulation_problem("amd64", "x86_64", tmp_path / "none") is None  # native
    assert images.emulation_problem("armhf", "aarch64", tmp_path / "none") is None
    unmounted = images.emulation_problem("arm64", "x86_64", tmp_path / "none")
    assert "binfmt_misc is not mounted" in unmounted
    assert "update-binfmts --enable qemu-aarch64" in unmounted
    assert "qemu-user-static" in unmounted and "mount -t binfmt_misc" in unmounted
    missing = images.emulation_problem("armhf", "x86_64", ok)
    assert "no binfmt_misc entry qemu-arm;" in missing
    assert "update-binfmts --enable qemu-arm`" in missing


def test_a_disabled_entry_or_one_without_the_F_flag_is_named(tmp_path: Path) -> None:
    d = binfmt(tmp_path, {"qemu-aarch64": AARCH64.replace("enabled", "disabled"),
                          "qemu-arm": "enabled\nflags: P\n"})  # fmt: skip
    assert "qemu-aarch64 is disabled" in images.emulation_problem("arm64", "x86_64", d)
    assert "lacks the F flag" in images.emulation_problem("armhf", "x86_64", d)


def test_the_node_config_names_a_foreign_image_and_refuses_an_unknown_one() -> None:
    # the plain name keeps its meaning: existing configs still name enorm-base-debian
    assert config.load().base_container == images.resolve("debian").container
    assert config.load(image="debian-arm64").base_container == \
        images.resolve("debian", "arm64").container
    with pytest.raises(config.ConfigError, match=r"^image: .*no architecture 'sparc'"):
        config.load(image="debian-sparc")
    with pytest.raises(config.ConfigError, match=r"^image: .*no such recipe"):
        config.load(image="gentoo")
