"""Backends whose bug needs a particular shape of batch, for the tests of ``pytest-attn minimize``
and ``--attn-fuzz``: each is the correct Einsum of planted_backends but for one condition. Importable
by tests, and as an installed package (``write_shrink_package``) by pytester runs and the CLI."""
from __future__ import annotations

import dataclasses
import os

from planted_backends import HERE, Einsum

LONG = 65  # WrongFromLength65 is wrong on a request with at least this many keys


class WrongFromLength65(Einsum):
    """Adds 0.5 to the rows of every request that attends over 65 keys or more (a tile-edge bug)."""

    name = "long65"

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        super().forward(q, k, v, metadata, plan, out, lse)
        for i, (start, stop) in enumerate(zip(metadata.qo_indptr, metadata.qo_indptr[1:])):
            if metadata.kv_lens[i] >= LONG:
                out[start:stop] += 0.5
        return out


class WrongOnMixedStep(Einsum):
    """Wrong only on a step where prompts and decoding requests share the batch."""

    name = "mixedbug"

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        super().forward(q, k, v, metadata, plan, out, lse)
        if metadata.has_cache and 0 < metadata.num_contexts < metadata.num_requests:
            out += 0.5
        return out


class RaisesOnThreeRequests(Einsum):
    """Raises in its own code on a batch of three requests or more."""

    name = "three"

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        if metadata.num_requests >= 3:
            raise IndexError("request table overflow")
        return super().forward(q, k, v, metadata, plan, out, lse)


class WrongWithWindow(Einsum):
    """Declares sliding windows and ignores them (Einsum attends over every key): only a case with a
    window shorter than its keys catches it."""

    name = "nowindow"
    capabilities = dataclasses.replace(Einsum.capabilities, sliding_window=True)


SHRINK_BACKENDS = [Einsum(), WrongFromLength65(), WrongOnMixedStep(), RaisesOnThreeRequests(), WrongWithWindow()]


def write_shrink_package(pytester) -> str:
    """Install SHRINK_BACKENDS through an entry point (package ``shrink_attn``); returns the
    PYTHONPATH a subprocess needs to see them too."""
    from backend_packages import write_backend_package

    site = write_backend_package(pytester, "shrink_attn", "from shrink_planted import SHRINK_BACKENDS\n",
                                 {"shrink": "shrink_attn:SHRINK_BACKENDS"})
    return f"{site}{os.pathsep}{HERE}"
