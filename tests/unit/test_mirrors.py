"""The Debian archive taken from a machine's apt sources (enorm.mirrors), on the sources
and downloaded Release files of the boards' systems (tests/fixtures/apt)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from enorm import mirrors

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "apt"
DEBIAN = "http://debian.mirror.example/debian"


def copy(machine: str, tmp_path: Path, *, lists: bool = True) -> Path:
    """A machine's fixture to change, optionally as before its first `apt-get update`."""
    root = tmp_path / machine
    shutil.copytree(FIXTURES / machine, root)
    if not lists:
        shutil.rmtree(root / "var/lib/apt/lists")
    return root


def test_both_forms_are_read_in_apts_order() -> None:
    found = mirrors.entries(FIXTURES / "debian12")
    assert [(e.uri, e.suites, e.components) for e in found] == [
        ("https://apt.vendor.example/repo", ("bookworm",), ("main",)),
        (DEBIAN, ("bookworm", "bookworm-updates"), ("main",)),
        ("http://debian.mirror.example/debian-security", ("bookworm-security",), ("main",)),
    ]  # deb-src, a paragraph with `Enabled: no` and a file apt does not read: left out
    assert found[0].signed_by == "/usr/share/keyrings/vendor.gpg"
    assert found[0].where.endswith("etc/apt/sources.list:2")
    assert found[2].where.endswith("debian.sources:8")
    # an embedded key on continuation lines stays one field
    armbian = mirrors.entries(FIXTURES / "armbian")
    assert armbian[1].signed_by.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----\n.\n")
    assert armbian[1].components == ("main", "contrib")


def test_a_vendor_listed_first_with_the_same_suite_is_not_taken(tmp_path: Path) -> None:
    """This machine's case: Debian's deb822 entries beside a vendor's one-line entry
    serving `bookworm main`, which comes first in apt's order."""
    assert mirrors.debian_mirror("bookworm", root=FIXTURES / "debian12") == DEBIAN
    # a suite no entry serves (bullseye's xstream): the Debian release archive, not the
    # security archive nor the vendor's
    assert mirrors.debian_mirror("bullseye", root=FIXTURES / "debian12") == DEBIAN
    # without the vendor's Release, Debian's own still decides
    root = copy("debian12", tmp_path)
    (root / "var/lib/apt/lists/apt.vendor.example_repo_dists_bookworm_InRelease").unlink()
    assert mirrors.debian_mirror("bookworm", root=root) == DEBIAN


def test_raspberry_pi_os_64_takes_debians_archive_not_the_pi_archive(tmp_path: Path) -> None:
    assert mirrors.debian_mirror("bookworm", root=FIXTURES / "rpios64") == DEBIAN
    # never updated: the entry for the suite in apt's order (sources.list first)
    assert mirrors.debian_mirror("bookworm", root=copy("rpios64", tmp_path, lists=False)) == DEBIAN
    # the Pi archive alone (its Release names its origin): refused
    root = copy("rpios64", tmp_path / "only-pi")
    (root / "etc/apt/sources.list").write_text("")
    with pytest.raises(mirrors.MirrorError, match="Raspberry Pi Foundation"):
        mirrors.debian_mirror("bookworm", root=root)


def test_raspberry_pi_os_32_has_no_debian_archive_and_the_error_names_the_setting() -> None:
    with pytest.raises(mirrors.MirrorError) as exc:
        mirrors.debian_mirror("bookworm", root=FIXTURES / "rpios32")
    msg = str(exc.value)
    assert "no Debian archive serving bookworm" in msg
    assert "http://raspbian.mirror.example/raspbian/ bookworm (Raspbian)" in msg
    assert "--mirror URL" in msg and mirrors.ENV in msg
    # the operator's setting wins, checked
    url = "http://debian.mirror.example/debian/"
    assert mirrors.debian_mirror("bookworm", override=url, root=FIXTURES / "rpios32") == DEBIAN
    with pytest.raises(mirrors.MirrorError, match="mirror: 'ftp://x' is not"):
        mirrors.debian_mirror("bookworm", override="ftp://x", root=FIXTURES / "rpios32")


def test_armbian_a_suite_alias_and_a_local_cache_with_a_port() -> None:
    """Armbian's archive serves `bookworm main` first in apt's order; Debian's entry names
    the suite `stable`, which its Release says is bookworm."""
    got = mirrors.debian_mirror("bookworm", root=FIXTURES / "armbian")
    assert got == "http://10.0.2.2:3142/debian_mirror/debian"


def test_a_cloud_images_mirror_list_before_any_update() -> None:
    """`mirror+file:` entries (Debian's cloud images): the first URL of the list; with no
    lists, an entry signed by Debian's keyring."""
    root = FIXTURES / "mirrorlist"
    assert mirrors.debian_mirror("bookworm", root=root) == "https://debian.mirror.example/debian"
    assert mirrors.debian_mirror("bullseye", root=root) == "https://debian.mirror.example/debian"


def test_no_sources_at_all(tmp_path: Path) -> None:
    with pytest.raises(mirrors.MirrorError, match="no deb entry with main"):
        mirrors.debian_mirror("bookworm", root=tmp_path)


def test_apts_list_file_names() -> None:
    assert mirrors.lists_name("http://user:pw@host.example/a_b/debian/", "bookworm") == \
        "host.example_a%5fb_debian_dists_bookworm_"
    assert mirrors.lists_name("https://10.0.2.2:3142/debian", "stable") == \
        "10.0.2.2:3142_debian_dists_stable_"


@pytest.mark.parametrize("uri", ["ftp://x.example/debian", "http://", "debian.example/x", ""])
def test_a_mirror_must_be_a_url_debootstrap_takes(uri: str) -> None:
    with pytest.raises(mirrors.MirrorError, match="--mirror: .* is not an http"):
        mirrors.check_uri(uri, "--mirror")


def test_file_mirrors_are_taken() -> None:
    assert mirrors.check_uri("file:///srv/mirror/debian/") == "file:///srv/mirror/debian"
