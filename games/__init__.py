"""Applications that enorm offloads to edge nodes (the iPokeMon-style game)."""
