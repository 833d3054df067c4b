"""Fixtures for tests on real edge nodes."""

from nodes import edge_node, own_base  # noqa: F401
