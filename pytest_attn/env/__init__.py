"""What this machine has: the backends found (``registry``: the built-in folder and entry points),
installed versions (``packages``), the torch build (``torch_build``) and the device a run names
(``devices``).

Imports: ``pytest_attn.core`` only. No pytest.
"""
