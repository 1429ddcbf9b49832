"""The validation suite: run it against any backend with `pytest --pyargs pytest_attn.suite --attn-backend=NAME`."""
