"""The merge policy as pure functions: what the cloud holds after a merge, and which keys a
pattern list names. `merge` applies the same rules with Redis commands (each type's row
in `redis_types`); the tests check against these."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from .redis_types import TYPES


def merge_rule(typ: bytes, cloud: Any, edge: Any) -> Any:
    """The value the cloud should hold after merging `edge` into `cloud` (None: absent).

    The union, by type (`redis_types.TYPES`: sets, hashes, sorted sets, lists); where
    both sides hold the same element with different values the edge wins, because the
    edge served the users (and saw the newer writes) for the whole tenure: a hash field
    takes the edge's value, a sorted-set member the higher score, a string the edge's
    value. A list is the cloud's, then the edge's items the cloud lacks (a multiset
    difference). A type the table does not know: the edge's value.
    """
    row = TYPES.get(typ)
    if cloud is None or row is None:
        return edge
    return row.merge(cloud, edge)


def contains(typ: bytes, cloud: Any, edge: Any) -> bool:
    """True when `cloud` holds everything of `edge` under the merge rule."""
    if cloud is None:
        return False
    row = TYPES.get(typ)
    return cloud == edge if row is None else row.contains(cloud, edge)


def matches(key: bytes, patterns: Iterable[str]) -> bool:
    return matcher(tuple(patterns))(key)


@lru_cache(maxsize=64)
def matcher(patterns: tuple[str, ...]) -> Callable[[bytes], bool]:
    """One test for all of `patterns` (glob, as `fnmatch.fnmatchcase`), on key bytes (a
    pattern's text as UTF-8, as Redis's own glob sees it): a merge asks it of every key
    on the edge."""
    if not patterns:
        return lambda key: False
    either = b"|".join(fnmatch.translate(p).encode() for p in patterns)
    match = re.compile(b"(?:" + either + b")").match
    return lambda key: match(key) is not None
