"""Make small backend packages on the fly, visible through the ``pytest_attn.backends`` entry-point
group exactly as a third-party package installed with pip would be."""
from __future__ import annotations

import textwrap

#: A test file for pytester runs: every selected backend on every selected catalog case.
CASE_TEST = """
from pytest_attn.check.harness import assert_case_passes, run_case

def test_case(attn_backend, attn_case, attn_device, attn_seed):
    assert_case_passes(run_case(attn_backend, attn_case, device=attn_device, seed=attn_seed), attn_backend, attn_case)
"""


def write_backend_package(pytester, module: str, source: str, entry_points: dict[str, str]):
    """Write ``module.py`` and a ``<module>-0.1.dist-info`` declaring the entry points into a
    folder, put it on sys.path for in-process runs, and return the folder (for PYTHONPATH)."""
    site = pytester.path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[pytest_attn.backends]\n{lines}\n")
    pytester.syspathinsert(site)
    return site


# A backend that delegates to the torch backend under another name, one that is never available,
# one that supports only head_dim 64, and one that forgets to write its last request.
DEMO_BACKENDS = '''
from pytest_attn.core.contract import Availability, Capabilities
from pytest_attn_backends.torch_sdpa import TorchSDPABackend


class Ghost(TorchSDPABackend):
    def available(self):
        return Availability(False, "needs the ghost library (pip install ghost-attn)")


class Narrow(TorchSDPABackend):
    capabilities = Capabilities(head_dims=frozenset({64}))


class ForgetsLastRequest(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None):
        full = super().forward(q, k, v, metadata, plan)
        last = metadata.qo_indptr[-2]
        out[:last] = full[:last]  # the last request's rows are never written
        return out


def demo():
    return TorchSDPABackend(name="demo")


ghost = Ghost(name="ghost")
narrow = Narrow(name="narrow")
forgets = ForgetsLastRequest(name="forgets")
'''
DEMO_ENTRY_POINTS = {"demo": "demo_attn:demo", "ghost": "demo_attn:ghost", "narrow": "demo_attn:narrow",
                     "forgets": "demo_attn:forgets"}


def backend_names_in_a_fresh_process(module: str, never_imported=("torch",)) -> list[str]:
    """Import a backend module in a new interpreter; the names of its BACKENDS, after asserting
    there that none of ``never_imported`` came in with it (heavy imports happen in methods only)."""
    import subprocess
    import sys

    code = (f"import sys, {module} as m; leaked = sorted(set({tuple(never_imported)!r}) & set(sys.modules)); "
            "assert not leaked, leaked; print(repr([b.name for b in m.BACKENDS]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip())
