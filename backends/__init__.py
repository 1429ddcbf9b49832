"""Built-in attention backends, one module each; pytest-attn finds every module here."""
