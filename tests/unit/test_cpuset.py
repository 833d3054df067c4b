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
