"""pytest-attn's own hooks, for plugins that extend it (as pytest-xdist's ``newhooks.py``)."""


def pytest_attn_suite_modules(config, backends):
    """Dotted names of test modules to run for ``backends`` (the selected :class:`Backend`
    objects, or every registered one when pytest-attn asks which modules exist). A backend's own
    ``Backend.suite_modules`` are answered by pytest-attn itself; a plugin may add more.

    :return: a list of dotted module names, or None.
    """
