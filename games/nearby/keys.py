"""Every Redis key name of Nearby, built in one place.

A user's keys carry the user id as their hash tag (`nb:profile:{ann}`); the key schema
(`app.key_schema`) names all of them. The shared keys (no hash tag) are the map's: per
cell its board (a stream), who is there (a set that expires), its card (a hash), its
latest message (a string that expires) and its recent posters (a list); and the cells by
activity (a sorted set). The route (user -> the server that serves them) never leaves the
cloud. Nothing here starts with `enorm:`, the cloud manager's namespace.
"""

from __future__ import annotations

import math

SESSION_TTL_S = 1800  # a login's token
TYPING_TTL_S = 30  # "is typing" markers
DRAFT_TTL_S = 7 * 86400  # drafts not touched for a week go
HERE_TTL_S = 300  # a cell's presence set, refreshed by each move into it
LATEST_TTL_S = 3600  # a cell's latest message id
BOARD_MAXLEN = 1000  # entries a cell's board keeps (approximately)
TRAIL_LEN = 20  # cells a user's trail keeps
RECENT_LEN = 50  # posters a cell's recent list keeps
CELL_DEG = 0.02  # a cell's side in degrees (about 2 km)

U = "<user>"  # the key schema's placeholder


# -- a user's keys (hash tag: the user id) ---------------------------------------------
def session(uid: str) -> str:
    """String, expires: the login's token."""
    return f"nb:session:{{{uid}}}"


def profile(uid: str) -> str:
    """Hash: name, lat, lng, cell, posts, updated."""
    return f"nb:profile:{{{uid}}}"


def inbox(uid: str) -> str:
    """Stream: direct messages to the user (from, text)."""
    return f"nb:inbox:{{{uid}}}"


def follows(uid: str) -> str:
    """Set: the users this user follows."""
    return f"nb:follows:{{{uid}}}"


def seen(uid: str) -> str:
    """Sorted set: board message ids the user has read, scored by when."""
    return f"nb:seen:{{{uid}}}"


def trail(uid: str) -> str:
    """List: the cells the user was in, newest first (TRAIL_LEN)."""
    return f"nb:trail:{{{uid}}}"


def typing(uid: str) -> str:
    """String, expires: the cell the user is writing a message for."""
    return f"nb:typing:{{{uid}}}"


def drafts(uid: str) -> str:
    """Set: the user's draft ids (the index of the `draft` family)."""
    return f"nb:drafts:{{{uid}}}"


def draft(uid: str, draft_id: str) -> str:
    """Hash, expires: one draft (text, cell, updated)."""
    return f"nb:draft:{{{uid}}}:{draft_id}"


FIXED = (session, profile, inbox, follows, seen, trail, typing, drafts)


# -- shared keys (no hash tag) -----------------------------------------------------------
def board(cell: str) -> str:
    """Stream: the messages posted in a cell (by, text, at)."""
    return f"nb:board:{cell}"


def here(cell: str) -> str:
    """Set, expires: the users in a cell lately."""
    return f"nb:here:{cell}"


def card(cell: str) -> str:
    """Hash: a cell's posts count, last poster and time."""
    return f"nb:cell:{cell}"


def latest(cell: str) -> str:
    """String, expires: the id of a cell's latest message."""
    return f"nb:latest:{cell}"


def recent(cell: str) -> str:
    """List: a cell's recent posters, newest first (RECENT_LEN)."""
    return f"nb:recent:{cell}"


CELLS = "nb:cells"  # Sorted set: cells scored by the messages posted there.
PER_CELL = (board, here, card, latest, recent)
SHARED_PATTERNS = [f("*") for f in PER_CELL] + [CELLS]

# -- cloud-only ---------------------------------------------------------------------------
ROUTE = "nb:route"  # Hash: user id -> base URL of the edge server that serves the user.


def cell_of(lat: float, lng: float) -> str:
    """The cell a position is in: its grid row and column (`r2575c-7`)."""
    return f"r{math.floor(lat / CELL_DEG)}c{math.floor(lng / CELL_DEG)}"


def around(cell: str) -> list[str]:
    """The cell and its eight neighbours."""
    r, _, c = cell[1:].partition("c")
    row, col = int(r), int(c)
    return [f"r{row + dr}c{col + dc}" for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


def is_user_id(uid: str) -> bool:
    return 0 < len(uid) <= 64 and all(ch.isascii() and (ch.isalnum() or ch in "_.:-")
                                      for ch in uid)
