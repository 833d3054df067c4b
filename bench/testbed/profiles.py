"""Link profiles of the testbed: the users' access networks and the edge's WAN paths.

Every figure is one-way (half the published RTT) and its public source is in
bench/README.md. Rates are in Mbit/s (None: not shaped)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    delay_ms: float  # one-way, each direction
    jitter_ms: float
    down_mbit: float | None = None  # towards the user / the edge
    up_mbit: float | None = None

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms


ACCESS = {
    # Home Wi-Fi: ~2-4 ms RTT to the access point (see README).
    "wifi": Link("wifi", delay_ms=2.0, jitter_ms=0.5, down_mbit=50, up_mbit=20),
    # 4G/LTE: Ofcom UK mobile report 2019-2020, median LTE latency ~40 ms RTT.
    "4g": Link("4g", delay_ms=20.0, jitter_ms=4.0, down_mbit=20, up_mbit=8),
    # 3G/HSPA: Ofcom UK mobile report, median 3G latency ~60-70 ms RTT.
    "3g": Link("3g", delay_ms=32.5, jitter_ms=8.0, down_mbit=4, up_mbit=1),
}

WAN = {
    # Belfast -> AWS eu-west-1 (Dublin): ~10-12 ms RTT (cloudping / paper Section 5).
    "near": Link("near", delay_ms=5.5, jitter_ms=0.5),
    # Belfast -> AWS us-east-1 (N. Virginia): ~80-90 ms RTT transatlantic.
    "far": Link("far", delay_ms=42.5, jitter_ms=1.5),
}
