"""Pure game rules: region codes, deterministic wild Pokemon, catch rolls."""

import pytest

from games.pokemon import logic


def test_region_code_is_a_geohash():
    assert logic.region_code(51.5072, -0.1276) == "gcpvj0"
    assert logic.region_code(48.8566, 2.3522) == "u09tvw"
    lat_lo, lat_hi, lng_lo, lng_hi = logic.region_bounds("gcpvj0")
    assert lat_lo <= 51.5072 <= lat_hi and lng_lo <= -0.1276 <= lng_hi
    with pytest.raises(logic.GameError):
        logic.region_code(91, 0)


def test_wild_pokemon_are_deterministic_per_region_and_window():
    t = 1_700_000_000.0
    a = logic.wild_pokemon("gcpvj0", t)
    assert a == logic.wild_pokemon("gcpvj0", t + 1)  # same window: same spawns
    assert a != logic.wild_pokemon("gcpvj0", t + logic.SPAWN_WINDOW_S)
    assert a != logic.wild_pokemon("u09tvw", t)
    assert len(a) == logic.SPAWNS_PER_REGION
    lat_lo, lat_hi, lng_lo, lng_hi = logic.region_bounds("gcpvj0")
    for w in a:
        assert 1 <= w["species"] <= logic.SPECIES
        assert lat_lo <= w["lat"] <= lat_hi and lng_lo <= w["lng"] <= lng_hi
        assert logic.find_spawn(w["spawn"], t) == w
    assert logic.find_spawn(a[0]["spawn"], t + logic.SPAWN_WINDOW_S) is None
    assert logic.find_spawn("garbage", t) is None


def test_catching_rules():
    assert logic.catch_chance(1) == pytest.approx(0.9)
    assert logic.catch_chance(logic.SPECIES) == pytest.approx(0.3)
    rolls = [logic.catch_roll("1", "gcpvj0-1-0", n, 1) for n in range(200)]
    assert rolls == [logic.catch_roll("1", "gcpvj0-1-0", n, 1) for n in range(200)]
    assert 0.8 < sum(rolls) / 200 <= 1.0


def test_levels_grow_with_xp():
    assert logic.level_for(0) == 1
    assert logic.level_for(100) == 2 and logic.level_for(10_000) == 11
