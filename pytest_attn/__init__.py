"""pytest-attn: a pytest plugin and validation suite for attention backends.

The public names are imported lazily, so ``import pytest_attn`` (and loading the plugin) imports
neither torch nor any backend library. ARCHITECTURE.md maps the subpackages.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Backend": "core.contract", "Plan": "core.contract", "Capabilities": "core.contract",
    "LayerSpec": "core.layer", "Tolerance": "core.contract", "FUSED_FLOAT32_TOLERANCE": "core.contract",
    "Availability": "core.contract", "BatchShape": "core.contract", "AttentionMetadata": "core.metadata", "PagedKVCacheManager": "core.kv_cache",
    "AttnError": "core.errors", "AttnInputError": "core.errors", "UnsupportedCase": "core.errors",
    "CacheFullError": "core.errors", "UnknownBackendError": "core.errors", "AttnCheckFailure": "core.errors",
    "AttnDeprecationWarning": "core.errors",
    "BatchCase": "cases.case", "CATALOG": "cases.catalog", "select": "cases.catalog",
    "reference_attention": "check.reference", "compare": "check.reference", "POISON": "check.reference",
    "run_case": "check.harness", "assert_case_passes": "check.harness", "run_forward": "check.harness",
    "compare_with_reference": "check.harness", "Forward": "check.harness", "Registry": "env.registry",
}
# The names and the signatures a backend author calls are listed in docs/api.md and snapshotted by
# tests/test_api_surface.py: a change there is a deliberate edit with a CHANGELOG.md line.
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pytest_attn' has no attribute {name!r}")
