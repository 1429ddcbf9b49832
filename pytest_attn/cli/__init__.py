"""The ``pytest-attn`` command (``main``: its parser and subcommands; ``backends_info``: what
``pytest-attn backends`` prints).

Imports: everything below the plugin (``core``, ``cases``, ``env``, ``check``, ``bench``,
``report``); never the plugin, so the command runs without a pytest session.
"""
