# The plugin itself loads through its pytest11 entry point (pip install -e .; pyproject's addopts name
# it with -p attn); this file only adds pytester, which the plugin's own tests use to run pytest
# inside pytest.
pytest_plugins = ["pytester"]
