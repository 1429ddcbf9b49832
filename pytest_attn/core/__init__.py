"""The contract a backend implements and what it is handed: a layer's parameters (``layer``), a
batch's metadata (``metadata``), the paged KV cache (``kv_cache``), the Backend contract
(``contract``), the checked calls into a backend (``calls``), pytest-attn's errors (``errors``) and
the fill value of unwritten memory (``poison``).

Imports: the standard library, numpy and torch (lazily) only; nothing else of pytest_attn.
"""
