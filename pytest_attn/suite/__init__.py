"""The bundled validation suite: run it against any backend with
``pytest --pyargs pytest_attn.suite --attn-backend=NAME`` (or just ``pytest --attn-backend=NAME``).

Imports: anything, the plugin's fixtures included; no backend by name (a backend's own tests live
beside it and are named by ``Backend.suite_modules``).
"""
