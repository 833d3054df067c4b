"""Fixtures for tests on real edge nodes."""

from nodes import edge_node  # noqa: F401
