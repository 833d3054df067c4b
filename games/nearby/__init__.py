"""Nearby: a location-based messages service, the second example app of enorm (the first
is the game, `games/pokemon`). Users post short messages to the board of the map cell
they are in, read what was posted around them, follow each other, keep drafts and send
direct messages. Its data looks unlike the game's: streams, sets, sorted sets, lists,
sessions and presence that expire, shared keys of every type. It is declared to the
cloud manager only through the public contract (docs/apps.md): `app.py`."""
