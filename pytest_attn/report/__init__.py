"""Reports of a run: the model computed from a run's data (``model``) and its Markdown and HTML
rendering with the Jinja2 templates in ``templates/`` (``render``).

Imports: ``core``, ``cases``, ``bench``. No pytest.
"""
