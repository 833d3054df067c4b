"""The daemon's memory (issue 28): what each termination leaves for the collector."""

from __future__ import annotations

import gc
import subprocess
import sys

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


def test_forgetting_connections_loads_conntrack_alone_not_all_of_pyroute2():
    # pyroute2's `__init__` imports every netlink family it has (IPDB, NDB with sqlite3,
    # ethtool...): 7.7 MB of the daemon's RSS, loaded at its first termination. A fresh
    # interpreter, as the daemon is: a real conntrack query, then what it loaded.
    code = (
        "import sys\n"
        "from enorm import firewall\n"
        "assert firewall.forget_connections({('10.255.255.9', 8080)}) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2', 'sqlite3'))\n"
        "assert 'pyroute2.conntrack' in loaded and 'pyroute2' not in loaded, loaded\n"
        "assert not [m for m in loaded if m.startswith(('pyroute2.ndb', 'pyroute2.ipdb',"
        " 'pyroute2.ethtool', 'sqlite3'))], loaded\n"
        "import pyroute2\n"  # whoever imports the package later gets all of it
        "assert pyroute2.Conntrack is sys.modules['pyroute2.conntrack'].Conntrack\n"
        "assert pyroute2.IPRoute and pyroute2.NDB\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
