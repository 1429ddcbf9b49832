"""pytest-attn: a pytest plugin and validation suite for attention backends.

The public names are imported lazily, so ``import pytest_attn`` (and loading the plugin) imports
neither torch nor any backend library.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "Backend": "contract", "Plan": "contract", "Capabilities": "contract", "LayerSpec": "contract",
    "Tolerance": "contract", "FUSED_FLOAT32_TOLERANCE": "contract", "Availability": "contract",
    "AttentionMetadata": "metadata", "PagedKVCacheManager": "kv_cache",
    "AttnError": "errors", "AttnInputError": "errors", "UnsupportedCase": "errors", "CacheFullError": "errors",
    "UnknownBackendError": "errors", "AttnCheckFailure": "errors", "AttnDeprecationWarning": "errors",
    "BatchCase": "cases", "CATALOG": "catalog", "select": "catalog",
    "reference_attention": "reference", "compare": "reference", "POISON": "reference",
    "run_case": "harness", "assert_case_passes": "harness", "run_forward": "harness",
    "compare_with_reference": "harness", "Forward": "harness", "Registry": "registry",
}
# The names and the signatures a backend author calls are listed in docs/api.md and snapshotted by
# tests/test_api_surface.py: a change there is a deliberate edit with a CHANGELOG.md line.
__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """The package, whose exported names keep their meaning: importing the submodule
    ``pytest_attn.compare`` (saved benchmark runs, for the CLI) would otherwise set the package's
    ``compare`` to that module, replacing the exported ``reference.compare`` depending on what was
    imported first. ``from pytest_attn.compare import ...`` still reads the submodule."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pytest_attn' has no attribute {name!r}")
