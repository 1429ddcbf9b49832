"""The pytest side of pytest-attn: its hooks (``hooks``, the ``pytest11`` entry point and what
``-p pytest_attn.plugin.hooks`` loads) and, by concern, the options (``options``), per-run state (``session``), fixtures and parametrization (``fixtures``), what a
collected test is to us (``collected``), the bundled suite and backends' own suites
(``bundled_suite``, hooks for extensions in ``hookspec``), --attn-isolate (``isolation``), the
header and closing section (``header``, ``summary``), rerun commands (``rerun``), whether a run
tested what it named (``run_verdict``), --attn-report (``run_report``), the garbage collector
(``gc_freeze``), and pytest-xdist (``xdist/``). The hooks stay thin: the work is in those modules.

Imports: every subpackage except ``cli``; nothing imports the plugin but the suite.
"""
