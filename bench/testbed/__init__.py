"""The emulated three-tier testbed (users, edge node, cloud) with a packet-level delayer."""

from .bed import EdgeBed, Testbed
from .profiles import ACCESS, WAN, Link

__all__ = ["ACCESS", "WAN", "EdgeBed", "Link", "Testbed"]
