"""The daemon's memory (issue 28): what each termination leaves for the collector."""

from __future__ import annotations

import gc

import lxc

from enorm.containers import Container


def _garbage_of(make) -> int:
    """Objects the collector alone frees after `make()` and dropping its result."""
    gc.collect()
    gc.disable()
    try:
        make()
        return gc.collect()
    finally:
        gc.enable()


def test_an_lxc_container_handle_goes_with_its_last_reference(tmp_path):
    # python3-lxc's own class is a reference cycle (its `network` list points back at
    # it): freed only by a collection, with ~26 KB of liblxc's memory each.
    assert _garbage_of(lambda: lxc.Container("enorm-tmem-c1", str(tmp_path))) > 0
    assert _garbage_of(lambda: Container("enorm-tmem-c1", str(tmp_path))) == 0
    assert Container("enorm-tmem-c1", str(tmp_path)).state == "STOPPED"
