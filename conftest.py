# The plugin itself loads through its pytest11 entry point (pip install -e .); this file only adds
# pytester, which the plugin's own tests use to run pytest inside pytest.
pytest_plugins = ["pytester"]
