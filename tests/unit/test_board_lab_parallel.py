"""The board lab's boards side by side (the lab itself runs in `make boards`, not here):
ports handed out once across threads, the results file written by two boards at once, when
the lab falls back to one board after the other, and a stop that reaches both boards."""

from __future__ import annotations

import _thread
import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.boards import lab, parallel, results

# Below the ephemeral range and away from the lab's own (27400 up, the apt proxy's 31400).
LO, HI = 29000, 29600


@pytest.fixture
def fresh_ports(monkeypatch):
    monkeypatch.setattr(lab, "_handed_out", set())


def test_boards_picking_ports_at_once_never_get_the_same_port(fresh_ports) -> None:
    got: list[list[int]] = []
    go = threading.Barrier(8)

    def pick() -> None:
        go.wait()
        got.append(lab.free_block(lab.NODE_PORTS + 4, start=LO, stop=HI))

    threads = [threading.Thread(target=pick) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ports = [p for block in got for p in block]
    assert len(got) == 8 and len(ports) == len(set(ports))
    for block in got:  # consecutive, as the 1:1 forwards need
        assert block == list(range(block[0], block[0] + lab.NODE_PORTS + 4))


def test_a_block_handed_out_is_not_handed_out_again_though_still_unbound(fresh_ports) -> None:
    first = lab.free_block(4, start=LO, stop=LO + 8)
    second = lab.free_block(4, start=LO, stop=LO + 8)  # `first` is free on the host still
    assert set(first).isdisjoint(second)
    with pytest.raises(RuntimeError, match="no 4 consecutive free ports"):
        lab.free_block(4, start=LO, stop=LO + 8)


def test_a_port_bound_elsewhere_is_skipped(fresh_ports) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", LO + 1))
        assert lab.free_block(4, start=LO, stop=LO + 12) == [LO + 4, LO + 5, LO + 6, LO + 7]


def board(arch: str, steps: int, failed: str | None = None) -> dict:
    return {"arch": arch, "facts": {}, "steps_s": {f"s{i}": 1.0 for i in range(steps)},
            "passed": [f"s{i}" for i in range(steps)], "figures": {}, "failed": failed}


def test_two_boards_saving_at_once_both_land_whole(tmp_path: Path) -> None:
    out = tmp_path / "boards.json"
    res = results.Results(out, {"mode": "full"})

    def steps(arch: str) -> None:
        for n in range(1, 60):
            res.put("boards", arch, board(arch, n))
            res.put("prepare_s", arch, {"total_s": float(n)})

    threads = [threading.Thread(target=steps, args=(a,)) for a in ("arm64", "amd64")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.save(complete=True)
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["mode"] == "full"
    assert {a: len(b["passed"]) for a, b in saved["boards"].items()} == {"arm64": 59,
                                                                          "amd64": 59}
    assert saved["prepare_s"] == {"arm64": {"total_s": 59.0}, "amd64": {"total_s": 59.0}}
    assert set(saved["host"]["cpu_s"]) == {"user", "system"} and saved["host"]["cores"] >= 1
    assert not list(tmp_path.glob("*.tmp"))


def test_a_board_ended_early_keeps_its_steps_and_its_own_failure(tmp_path: Path) -> None:
    res = results.Results(tmp_path / "r.json", {})
    res.put("boards", "arm64", board("arm64", 3))
    res.fail("arm64", "stopped (^C or SIGTERM)")
    res.put("boards", "amd64", board("amd64", 2, failed="CheckFailed: memory.max inside"))
    res.fail("amd64", "stopped (^C or SIGTERM)")
    res.fail("riscv64", "RuntimeError: disk riscv64: debootstrap failed")  # never started
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["boards"]["arm64"]["passed"] == ["s0", "s1", "s2"]
    assert res.failed() == {"arm64": "stopped (^C or SIGTERM)",
                            "amd64": "CheckFailed: memory.max inside",
                            "riscv64": "RuntimeError: disk riscv64: debootstrap failed"}
    assert saved["boards"]["riscv64"]["figures"] == {} and not saved["complete"]


@pytest.mark.parametrize(("boards", "serial", "cores", "free_mb", "why"), [
    (2, False, 2, 8000, None),
    (1, False, 1, 500, None),  # one board: nothing to put side by side
    (2, True, 2, 8000, "--serial"),
    (2, False, 1, 8000, "1 core(s) for 2 boards"),
    (2, False, 2, 2 * parallel.BOARD_MB - 1, "MB available, 2 boards side by side need"),
])
def test_when_the_boards_run_one_after_the_other(boards, serial, cores, free_mb, why) -> None:
    got = parallel.why_serial(boards, serial=serial, cores=cores, free_mb=free_mb)
    assert got == why if why in (None, "--serial") else why in got


def test_the_memory_available_is_read_from_meminfo(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 3145728 kB\n")
    assert parallel.available_mb(tmp_path / "meminfo") == 3072


def test_every_line_of_a_board_says_which() -> None:
    lines: list[str] = []
    say = parallel.prefixed("arm64", lines.append)
    say("disk arm64: reusing root.img")
    say("[arm64] boot ...")
    assert lines == ["[arm64] disk arm64: reusing root.img", "[arm64] boot ..."]


def test_one_boards_failure_leaves_the_other_running() -> None:
    ended: list[str] = []

    def fails() -> None:
        raise RuntimeError("disk build failed")

    def slow() -> None:
        time.sleep(0.5)
        ended.append("amd64")

    said: list[str] = []
    parallel.run({"arm64": fails, "amd64": slow}, {}, said.append)
    assert ended == ["amd64"]
    assert said == ["[arm64] ended by RuntimeError: disk build failed"]


def test_a_stop_stops_every_boards_vm_and_unwinds_both_threads() -> None:
    unwound: list[str] = []
    stopped: list[str] = []
    live: dict = {}
    said: list[str] = []

    def job(arch: str):
        def run() -> None:
            live[arch] = SimpleNamespace(vm=SimpleNamespace(
                stop=lambda: stopped.append(arch), remove=lambda: None))
            try:
                while True:  # a board's step waiting on its VM
                    time.sleep(0.05)
            finally:
                unwound.append(arch)
        return run

    threading.Timer(0.5, _thread.interrupt_main).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        parallel.run({"arm64": job("arm64"), "amd64": job("amd64")}, live, said.append)
    assert sorted(unwound) == ["amd64", "arm64"] and sorted(stopped) == ["amd64", "arm64"]
    assert time.monotonic() - t0 < 10
    assert said == ["stopping the boards (arm64, amd64)"]
