"""pytest-attn under pytest-xdist: a GPU per worker with its share of threads and JIT jobs
(``gpu_workers``) and the longest-first schedule (``schedule``).

Imports: ``env`` and the plugin's ``collected``.
"""
