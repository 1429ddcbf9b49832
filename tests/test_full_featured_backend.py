"""The backend author's API, as a backend author uses it: tests/full_featured_backend.py (every
capability declared, written only against ``pytest_attn``'s public names) is installed through a
``pytest_attn.backends`` entry point and runs the whole catalog, as a third-party package would, so
a change that breaks backend authors fails here first."""
import ast
import dataclasses
import pathlib

import pytest

from backend_packages import CASE_TEST, write_backend_package
from pytest_attn import CATALOG, Capabilities
from pytest_attn.core.layer import DTYPES, KV_DTYPES, KV_LAYOUTS, MASKS
from pytest_attn.plugin.session import CPU_MAX_TOKENS

SOURCE = pathlib.Path(__file__).with_name("full_featured_backend.py")
ENTRY_POINTS = {"full-featured": "full_featured_attn:BACKENDS"}


def _backend():
    namespace = {}
    exec(compile(SOURCE.read_text(), str(SOURCE), "exec"), namespace)
    return namespace["FullFeaturedBackend"]


def test_it_declares_every_capability():
    backend = _backend()
    caps = backend.capabilities
    features = [f.name for f in dataclasses.fields(Capabilities) if f.type in ("bool", bool)]
    assert [name for name in features if not getattr(caps, name)] == []
    assert caps.kv_dtypes == frozenset(KV_DTYPES) | {"bfloat16", "float16"} and caps.lse_base is not None
    assert caps.dtypes == frozenset(DTYPES) and caps.masks == frozenset(MASKS)
    assert caps.kv_layouts == frozenset(KV_LAYOUTS) and caps.head_dims is None and caps.max_head_dim is None
    assert "cpu" in caps.devices and backend.requires_contiguous is False


def test_it_is_written_only_against_the_public_api():
    imports = set()
    for node in ast.walk(ast.parse(SOURCE.read_text())):
        if isinstance(node, ast.Import):
            imports |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imports.add(node.module)
    assert imports == {"math", "torch", "pytest_attn"}, "import only pytest_attn's public names (docs/api.md)"
    assert "kv_indptr" not in SOURCE.read_text().replace("kv_rows_indptr", "")  # no deprecated name


def _install(pytester, extra: str = "", entry_points=ENTRY_POINTS):
    write_backend_package(pytester, "full_featured_attn", SOURCE.read_text() + extra, entry_points)
    pytester.makepyfile(CASE_TEST)


@pytest.mark.attn_long
def test_it_runs_the_whole_catalog_through_an_entry_point_with_nothing_skipped(pytester):
    # Every catalog case within the CPU limit, one process: 25 s measured on the shared 2-core
    # machine at load 9. attn_long starts it first under xdist, as the project's other long tests.
    _install(pytester)
    result = pytester.runpytest("--attn-backend=full-featured", "-p", "no:randomly", "-q", "-W",
                                "error::DeprecationWarning")
    on_cpu = [c for c in CATALOG.values() if c.max_tokens <= CPU_MAX_TOKENS]
    result.assert_outcomes(passed=len(on_cpu), deselected=len(CATALOG) - len(on_cpu))


DROPS_SINKS = '''

class DropsSinks(FullFeaturedBackend):
    """Planted bug: the sinks never reach the softmax."""

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        import dataclasses

        plan = dataclasses.replace(plan, layer=dataclasses.replace(plan.layer, sinks=()))
        return super().forward(q, k, v, metadata, plan, out, lse)


BROKEN = [DropsSinks()]
BROKEN[0].name = "drops-sinks"
'''


def test_the_same_run_fails_a_planted_bug(pytester):
    _install(pytester, DROPS_SINKS, {**ENTRY_POINTS, "drops-sinks": "full_featured_attn:BROKEN"})
    result = pytester.runpytest("--attn-backend=full-featured,drops-sinks", "--attn-cases=sinks-prefill",
                                "-p", "no:randomly", "-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*sinks-prefill*16 sinks*EXCEEDS*",
                                 "*backend 'drops-sinks' is wrong on case 'sinks-prefill'*"])
