"""The cloud side at internet scale, by simulation (issue 32).

Pieces: `nodes` (simulated edge nodes speaking the node's protocol, many per asyncio
process), `cluster` (a 3-master Redis Cluster with replicas), `manager` (one
cloud-manager process: the library's heartbeats, placement, handshake and ledger),
`run` (the bench: starts them, measures, takes nodes and a master down), and
`__main__` (the sizes, JSON and plot in bench/results/fleet.json / fleet.png).
"""
