"""The merge policy as pure functions: what the cloud holds after a merge, and which keys a
pattern list names. `merge` applies them with Redis commands; the tests check against
these."""

from __future__ import annotations

import fnmatch
from collections import Counter
from typing import Any


def merge_rule(typ: bytes, cloud: Any, edge: Any) -> Any:
    """The value the cloud should hold after merging `edge` into `cloud` (None: absent).

    The union rule, by type; where both sides hold the same element with different
    values the edge wins, because the edge served the users (and saw the newer writes)
    for the whole tenure:
      set    union of members
      hash   union of fields; a field on both sides takes the edge's value
      zset   union of members; a member on both sides keeps the higher score
      list   the cloud's list, then the edge's items the cloud lacks (multiset difference)
      string the edge's value
    `merge_back` applies the same rule with Redis commands; this pure form documents it
    and is what the tests check against.
    """
    if cloud is None:
        return edge
    if typ == b"set":
        return set(cloud) | set(edge)
    if typ == b"hash":
        return {**cloud, **edge}
    if typ == b"zset":
        merged = dict(cloud)
        for member, score in dict(edge).items():
            merged[member] = max(score, merged.get(member, score))
        return merged
    if typ == b"list":
        have = Counter(cloud)
        extra = []
        for item in edge:
            if have[item] > 0:
                have[item] -= 1
            else:
                extra.append(item)
        return list(cloud) + extra
    return edge


def contains(typ: bytes, cloud: Any, edge: Any) -> bool:
    """True when `cloud` holds everything of `edge` under the merge rule."""
    if cloud is None:
        return False
    if typ == b"set":
        return set(edge) <= set(cloud)
    if typ == b"hash":
        return all(cloud.get(f) == v for f, v in edge.items())
    if typ == b"zset":
        c = dict(cloud)
        return all(m in c and c[m] >= s for m, s in edge)
    if typ == b"list":
        return not (Counter(edge) - Counter(cloud))
    return cloud == edge


def matches(key: bytes, patterns: list[str]) -> bool:
    name = key.decode("latin-1")
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
