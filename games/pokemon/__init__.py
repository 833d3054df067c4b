"""An iPokeMon-style location game: cloud server, edge server, client, key schema.

The edge server (edge.py) runs inside an enorm container where only Debian bookworm's
python3-flask (2.2) and python3-redis (4.3) exist, so edge.py, keys.py and logic.py use
nothing else. cloud.py, client.py and record.py run on the cloud side.
"""
