"""The cpuset that goes with a CPU quota: how many CPUs, which, and the kernel's format."""

import pytest

from enorm.containers import cpu_list, cpuset, parse_cpu_list


@pytest.mark.parametrize(("cpus", "text"), [
    ([0], "0"), ([0, 1], "0-1"), ([0, 1, 2, 5], "0-2,5"), ([3, 1, 2], "1-3"),
    ([0, 2, 4], "0,2,4"), ([7, 0, 6], "0,6-7"),
])  # fmt: skip
def test_the_kernels_list_format_both_ways(cpus, text):
    assert cpu_list(cpus) == text
    assert parse_cpu_list(text) == sorted(cpus)


def test_as_many_cpus_as_the_quota_rounded_up_within_the_board():
    host = [0, 1, 2, 3]
    assert cpuset(0.25, host, 0) == [0]
    assert cpuset(1.0, host, 0) == [0]
    assert cpuset(1.5, host, 0) == [0, 1]
    assert cpuset(2.0000001, host, 0) == [0, 1]  # a float sum of units is still 2
    assert cpuset(8.0, host, 1) == [1, 2, 3, 0]
    assert cpuset(0.0, host, 2) == [2]  # never an empty set: the kernel refuses it


def test_neighbours_spread_over_the_board_and_wrap():
    host = [0, 1]
    placed = [cpuset(1.0, host, first % 2) for first in range(4)]
    assert placed == [[0], [1], [0], [1]]
    assert cpuset(2.0, [2, 5, 7], 2) == [7, 2]


@pytest.mark.parametrize("was", [True, False])
def test_a_refused_limit_puts_back_what_was_written_before_it(tmp_path, monkeypatch, was):
    """All or nothing: the memory goes first; when the kernel then refuses the CPU
    quota, the memory goes back to the limits the node gave (without reading the
    kernel's values first: 23 ms of a resize on the board VM), or to the values read."""
    from enorm import containers
    from enorm.protocol import Resources

    class Fake:
        running = True
        items = {"memory.max": str(64 << 20), "cpu.max": "25000 100000", "cpuset.cpus": "1"}
        reads = 0

        def get_config_item(self, key):
            return ["10.0.3.5/24"]

        def get_cgroup_item(self, key):
            Fake.reads += 1
            return self.items[key]

        def set_cgroup_item(self, key, value):
            if key == "cpu.max" and value.startswith("50000"):
                return False  # the kernel's no
            self.items[key] = value
            return True

    monkeypatch.setattr(containers, "cgroup_version", lambda: 2)
    cs = containers.Containers(tmp_path, "enorm-tc-", "enorm-base-debian")
    cs.host_cpus = [0, 1, 2, 3]
    fake = Fake()
    monkeypatch.setattr(cs, "_get", lambda name: fake)
    old = Resources(cores=0.25, memory_mb=64)
    with pytest.raises(containers.LimitRefused):
        cs.set_limits("enorm-tc-a", Resources(cores=0.5, memory_mb=128),
                      was=old if was else None)
    assert fake.items["memory.max"] == str(64 << 20)
    assert Fake.reads == (0 if was else 3)
