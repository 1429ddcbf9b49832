"""Keep CPython's cyclic garbage collector off the objects that live for the whole run.

After collection, a pytest process that tests attention backends holds torch (often FlashInfer
and cuDNN too) and every collected item: thousands of modules and most of a million objects that
live until the process ends. The collector still walks all of them in every full collection: the
automatic ones that a test's allocations trigger, the five in a row that pytest runs after the
last test to flush unraisable exceptions, and the one at interpreter exit. In a serial run of
this project's tests on a 2-core machine that was 4.7 s of 48 s (the exit after the last test
took 2.2 s; 0.6 s with the freeze), and every xdist worker pays it again.

``gc.freeze()`` moves every object alive at that moment into a generation the collector never
scans; objects made later are collected as usual. The outermost session of a process freezes
twice, each time right after one full collection, so that no garbage is frozen: once after
collection, and once after the last test (before pytest's own collections, which then only walk
what the tests left). The freeze is undone once pytest has cleaned up, so that a program that
called ``pytest.main()`` and goes on gets its collector back as it was; at interpreter exit
everything is frozen again, which skips the last collection (``__del__`` of objects still in
reference cycles at exit, which CPython does not promise to run anyway).

In-process runs of pytest inside a test (pytester) never freeze: the outer run owns the heap.
``--attn-gc-freeze=off`` turns all of this off.
"""
from __future__ import annotations

import atexit
import gc

_active_configs: list = []  # configured pytest runs of this process, outermost first
_frozen_by: set[int] = set()  # id() of the configs whose freeze is in force


def enabled(config) -> bool:
    return config.getoption("attn_gc_freeze", "on") != "off"


def is_outermost(config) -> bool:
    return bool(_active_configs) and _active_configs[0] is config


def start(config) -> None:
    """At configure, before pytest's unraisable-exception plugin configures: its clean-up (the five
    collections) is registered after this one's, so it runs first (clean-ups run last in, first out)."""
    _active_configs.append(config)
    config.add_cleanup(lambda: _finish(config))
    if enabled(config) and is_outermost(config):
        atexit.unregister(gc.freeze)  # once, however many runs this process makes
        atexit.register(gc.freeze)


def freeze(config) -> None:
    """After collection and after the last test: a full collection, then freeze what survived."""
    if not enabled(config) or not is_outermost(config):
        return
    gc.collect()
    gc.freeze()
    _frozen_by.add(id(config))


def _finish(config) -> None:
    if id(config) in _frozen_by:
        _frozen_by.discard(id(config))
        gc.unfreeze()
    if config in _active_configs:
        _active_configs.remove(config)
