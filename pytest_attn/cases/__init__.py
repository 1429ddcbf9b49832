"""Cases: the model of a named case (``case``: layers and a schedule of steps) and the catalog of
named cases drawn from real attention bugs (``catalog``).

Imports: ``pytest_attn.core`` only.
"""
