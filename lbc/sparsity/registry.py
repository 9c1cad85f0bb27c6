"""The registry of sparsity methods: its names are the values of ``sparsity.method``."""

from __future__ import annotations

from lbc.registry import Registry

METHODS: Registry = Registry("sparsity method")
