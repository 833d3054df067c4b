"""Every Redis key name of the game, built in one place.

A user's keys carry the user id as a hash tag (`u:{42}`): enorm finds them by pattern
to copy them to an edge node and back, and in Redis Cluster they share one slot.
Shared keys (the global map) have no hash tag; the edge writes them too, and on
termination they are merged into the cloud as a union (`SHARED_PATTERNS`).
Cloud-only keys (identities, the id counter, the redirection config) never leave it.
"""

# Patterns of the shared keys, passed by the cloud manager as DataSink.shared_patterns.
SHARED_PATTERNS = ["region:*", "regions"]
# Pattern of one user's keys; `{` and `}` cannot occur in a user id.
USER_PATTERN = "*{%s}*"


def user(uid: str) -> str:
    """Hash: profile (name, provider, token, created, level, xp, pm_seq)."""
    return f"u:{{{uid}}}"


def pokedex(uid: str) -> str:
    """Set: species numbers the user has caught."""
    return f"pokedex:{{{uid}}}"


def pokemon(uid: str, pm_uid: str | int) -> str:
    """Hash: one caught Pokemon (species, name, cp, level, caught_at, region)."""
    return f"pm:{{{uid}}}:{pm_uid}"


def pokemon_index(uid: str) -> str:
    """Sorted set: the user's Pokemon uids scored by catch time (the party is the top 6)."""
    return f"pms:{{{uid}}}"


def location(uid: str) -> str:
    """Hash: last location (lat, lng, region, ts)."""
    return f"loc:{{{uid}}}"


def caught(uid: str) -> str:
    """Set: wild spawn ids the user caught already (a spawn is caught once)."""
    return f"caught:{{{uid}}}"


def user_keys_pattern(uid: str) -> str:
    return USER_PATTERN % uid


def region(code: str) -> str:
    """Set (shared): annotations of one region of the global map (`user:<id>`, ...)."""
    return f"region:{code}"


REGIONS = "regions"  # Set (shared): every region code of the global map.

# Cloud-only keys.
NEXT_USER_ID = "next:user"  # String counter for new user ids.
REDIRECT = "config:redirect"  # Hash: user id -> base URL of the server that serves it.


def identity(provider: str, ident: str) -> str:
    """String: the user id of an identity at a provider (cloud-only)."""
    return f"id:{provider}:{ident}"


def is_valid_user_id(uid: str) -> bool:
    return (
        bool(uid)
        and len(uid) <= 64
        and all((c.isascii() and c.isalnum()) or c in "_.:-" for c in uid)
    )
