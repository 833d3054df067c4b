"""The game's key schema: user keys carry the user id as a hash tag; shared keys don't."""

from fnmatch import fnmatchcase

from enorm.datasync import hash_tag
from games.pokemon import keys


def test_user_keys_carry_the_hash_tag():
    for key in [
        keys.user("42"),
        keys.pokedex("42"),
        keys.pokemon("42", 7),
        keys.pokemon_index("42"),
        keys.location("42"),
        keys.caught("42"),
    ]:
        assert hash_tag(key.encode()) == b"42", key
        assert fnmatchcase(key, keys.user_keys_pattern("42"))
    assert keys.user("42") == "u:{42}" and keys.pokemon("42", 7) == "pm:{42}:7"
    assert keys.location("42") == "loc:{42}" and keys.pokedex("42") == "pokedex:{42}"


def test_shared_and_cloud_keys_have_no_tag_and_match_shared_patterns():
    shared = [keys.region("gcpvj0"), keys.REGIONS]
    for key in shared:
        assert hash_tag(key.encode()) is None
        assert any(fnmatchcase(key, p) for p in keys.SHARED_PATTERNS)
    for key in [keys.NEXT_USER_ID, keys.REDIRECT, keys.identity("google", "a@b")]:
        assert hash_tag(key.encode()) is None
        assert not any(fnmatchcase(key, p) for p in keys.SHARED_PATTERNS)
    assert not any(fnmatchcase(keys.user("1"), p) for p in keys.SHARED_PATTERNS)


def test_user_id_validation():
    assert keys.is_valid_user_id("42") and keys.is_valid_user_id("a.b:c-d_e")
    for bad in ["", "a{b", "a}b", "a b", "x" * 65, "é"]:
        assert not keys.is_valid_user_id(bad)
