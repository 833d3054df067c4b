"""Dynamic priorities (an optional mode, off by default): a server's priority follows its
workload, as in DYVERSE (the paper's group's later work on vertical scaling at the edge),
so that the auto-scaler's round helps where users are served badly or many users are
served, and lets go first of what nobody uses.

The rule (policy, pure), from what the round measured for the server:
  +1  its users are served above their latency objective (it needs the resources);
  +1  it serves at least `users_step` users (a big group depends on it);
  -1  it has no users, or none of them made a request for half the idle timeout.
The result stays within `max_boost` of the declared priority and never below 0. It is
used by Procedures 5 and 6 (the order in which servers are served, and who is evicted for
whom); admission and the pressure watcher keep the declared priority, which is what a
cloud manager asked for and is the only figure known before anything is measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from enorm.autoscaler import ServerSnapshot, Snapshot


@dataclass(frozen=True)
class Rule:
    users_step: int = 1000
    max_boost: int = 1
    idle_after_s: float = 600.0

    def __post_init__(self) -> None:
        if self.users_step < 1 or self.max_boost < 0 or not self.idle_after_s > 0:
            raise ValueError("users_step >= 1, max_boost >= 0 and idle_after_s > 0")


def boost(s: ServerSnapshot, rule: Rule) -> int:
    """The rule's adjustment for `s`, before the bound."""
    b = 0
    if s.users and s.latency_ms is not None and s.latency_ms > s.latency_objective_ms:
        b += 1
    if s.users >= rule.users_step:
        b += 1
    if not s.users or (s.idle_for_s is not None and s.idle_for_s >= rule.idle_after_s / 2):
        b -= 1
    return b


def effective(s: ServerSnapshot, rule: Rule) -> int:
    """The priority the round uses for `s`."""
    b = max(-rule.max_boost, min(rule.max_boost, boost(s, rule)))
    return max(0, s.priority + b)


def apply(snapshot: Snapshot, rule: Rule) -> Snapshot:
    """The snapshot with each server's effective priority (its declared one kept in
    `declared_priority`)."""
    return replace(snapshot, servers=tuple(
        replace(s, priority=effective(s, rule), declared_priority=s.priority)
        for s in snapshot.servers))
