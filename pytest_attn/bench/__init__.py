"""Timing: timers that keep device, eager, host and plan time apart (``timing``), measuring a
backend on a batch and what a row records (``measure``), the machine a run timed on (``machine``),
saved runs compared across commits (``compare``) and the harness's self-check (``fidelity``).

Imports: ``core``, ``cases``, ``env``, ``check``. No pytest: measuring needs no pytest session.
"""
