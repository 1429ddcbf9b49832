"""Versions of installed distributions, read from their metadata without importing them."""
from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from typing import Optional


def dist_version(*names: str) -> Optional[str]:
    """The version of the first of these distributions that is installed, or None."""
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def flashinfer_version() -> Optional[str]:
    """FlashInfer's version from package metadata, or from the module where it was unpacked without
    any (as on a GPU image that brings it as an archive); None when it is not installed."""
    found = dist_version("flashinfer-python", "flashinfer")
    if found is not None or importlib.util.find_spec("flashinfer") is None:
        return found
    import flashinfer

    return getattr(flashinfer, "__version__", None)
