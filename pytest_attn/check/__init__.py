"""The checks: the high-precision reference and the tolerance rule (``reference``), a case run
through a backend step by step (``harness``), batches built by hand (``batch``), one case through
every backend (``differential``) and correctness under CUDA-graph replay (``graph_replay``).

Imports: ``core``, ``cases``, ``env``. No pytest.
"""
