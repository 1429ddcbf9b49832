"""No backend package can break pytest: every entry-point form the README documents works, and a
package that fails in any way is reported for that backend alone (unavailable, or that test failed)
with the package, the entry point and the fix, while every other backend and test runs."""
import pytest

from backend_packages import CASE_TEST, write_backend_package

ONE_CASE = "--attn-cases=hd64-ragged"
# A correct backend, written out in torch (the README's kind), that the forms below expose.
GOOD = '''
import torch
from pytest_attn import Backend, Capabilities, Plan


class Good(Backend):
    name = "good"
    capabilities = Capabilities()

    def __init__(self, name="good"):
        self.name = name

    def plan(self, metadata, layer, device="cpu"):
        return Plan(self.name, "naive", "torch", "NHD", "tokens", metadata.has_cache, device=device, layer=layer)

    def forward(self, q, k, v, metadata, plan, out=None):
        layer = plan.layer
        for start, stop in zip(metadata.qo_indptr, metadata.qo_indptr[1:]):
            qi, ki, vi = (t[start:stop].float() for t in (q, k, v))
            ki, vi = (t.repeat_interleave(layer.group_size, dim=1) for t in (ki, vi))
            s = torch.einsum("qhd,khd->hqk", qi, ki) * layer.scale
            if layer.causal:
                n = stop - start
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            out[start:stop] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vi).to(out.dtype)
        return out
'''


def install(pytester, source, entry_points):
    """The package pkg_attn 0.1 with this source and entry points, and the one-case test file."""
    write_backend_package(pytester, "pkg_attn", GOOD + source, entry_points)
    pytester.makepyfile(CASE_TEST)


def run_with(pytester, source, entry_points, *args):
    install(pytester, source, entry_points)
    return pytester.runpytest(ONE_CASE, *args)


# -- every documented form works ---------------------------------------------------------------------
FORMS = {
    "a list": ("BACKENDS = [Good('good')]", "pkg_attn:BACKENDS"),
    "a tuple of a class and an instance": ("class Good2(Good):\n    name = 'good2'\n"
                                           "    def __init__(self):\n        self.name = 'good2'\n"
                                           "PAIR = (Good2, Good('good'))", "pkg_attn:PAIR"),
    "a module with BACKENDS": ("BACKENDS = [Good('good')]", "pkg_attn"),
    "a module with backends()": ("def backends():\n    return [Good('good')]", "pkg_attn"),
    "a Backend instance": ("INSTANCE = Good('good')", "pkg_attn:INSTANCE"),
    "a Backend class": ("", "pkg_attn:Good"),
    "a function returning an instance": ("def make():\n    return Good('good')", "pkg_attn:make"),
    "a function returning a list": ("def make():\n    return [Good('good')]", "pkg_attn:make"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_documented_entry_point_form_registers_its_backends(pytester, form):
    source, target = FORMS[form]
    result = run_with(pytester, source, {"mine": target}, "--attn-backend=good")
    result.assert_outcomes(passed=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


# -- broken packages -----------------------------------------------------------------------------------
# (module source, entry point target, what the header's "unavailable" reason says)
BROKEN = {
    "fails to import": ("import no_such_library_xyz", "pkg_attn:Good",
                        "mine (package pkg_attn 0.1, entry point 'mine = pkg_attn:Good' failed to import: "
                        "ModuleNotFoundError: No module named 'no_such_library_xyz'; fix the package's entry point in "
                        "group 'pytest_attn.backends'; or uninstall it: pip uninstall pkg_attn)"),
    "raises at import": ("raise RuntimeError('no GPU driver')", "pkg_attn:Good",
                         "*failed to import: RuntimeError: no GPU driver; *pip uninstall pkg_attn)"),
    "exits at import": ("import sys\nsys.exit(3)", "pkg_attn:Good", "*failed to import: SystemExit: 3*"),
    "names nothing usable": ("NOTHING = 42", "pkg_attn:NOTHING",
                             "*names 42, which is not a Backend, a Backend class, a list of them, a module or a function*"),
    "an empty list": ("BACKENDS = []", "pkg_attn:BACKENDS", "*exposes no backends (an empty list)*"),
    "a list holding a non-backend": ("BACKENDS = ['torch']", "pkg_attn:BACKENDS",
                                     "*names 'torch', which is not a Backend*"),
    "a missing attribute": ("", "pkg_attn:BACKENDZ", "*failed to import: AttributeError*BACKENDZ*"),
    "an abstract class": ("from pytest_attn import Backend\nclass Half(Backend):\n    name = 'half'",
                          "pkg_attn:Half", "*names the class Half, which cannot be built without arguments "
                                           "(TypeError: *abstract*implement plan() and forward()*"),
    "a class that is not a backend": ("class Foo:\n    pass", "pkg_attn:Foo",
                                      "*names the class Foo, which is not a subclass of pytest_attn.Backend*"),
    "a name with a comma": ("BAD = Good('a,b')", "pkg_attn:BAD", "*give it a name without commas*"),
    "a function that raises": ("def make():\n    raise ValueError('config missing')", "pkg_attn:make",
                               "*raised ValueError: config missing while listing its backends*"),
}


def assert_usage_error(result, pattern: str) -> None:
    """Exit 4 with one line on stderr, no traceback (issue 17: naming a broken backend tests nothing)."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    lines = [line for line in result.stderr.lines if line.strip()]
    assert len(lines) == 1, lines
    result.stderr.fnmatch_lines([pattern])


@pytest.mark.parametrize("problem", list(BROKEN))
def test_a_broken_package_is_an_unavailable_backend_and_everything_else_runs(pytester, problem):
    source, target, reason = BROKEN[problem]
    install(pytester, source, {"mine": target})
    result = pytester.runpytest(ONE_CASE, "--attn-backend=torch")
    result.assert_outcomes(passed=1)  # the other backend runs
    result.stdout.fnmatch_lines([f"attn unavailable: *{reason}*"])
    everything = pytester.runpytest(ONE_CASE, "--attn-backend=all", "-rs")  # 'all': unusable ones skip
    everything.stdout.fnmatch_lines(["*backend 'mine' is unavailable here: *package pkg_attn 0.1*"])
    assert everything.ret == pytest.ExitCode.OK
    for named in (pytester.runpytest(ONE_CASE, "--attn-backend=mine"),
                  pytester.runpytest(ONE_CASE, "--attn-backend=torch,mine", "--attn-strict")):
        assert_usage_error(named, "ERROR: pytest-attn: --attn-backend=mine cannot be used: *package pkg_attn 0.1*")
    assert "INTERNALERROR" not in result.stdout.str() + everything.stdout.str()


def test_a_bad_package_beside_a_good_one_leaves_the_good_one_usable(pytester):
    write_backend_package(pytester, "pkg_attn", GOOD + "\nBACKENDS = [Good('good')]\n", {"good": "pkg_attn:BACKENDS"})
    write_backend_package(pytester, "bad_attn", "import no_such_library_xyz\n", {"bad": "bad_attn:X"})
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest(ONE_CASE, "--attn-backend=good", "-rs")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["attn unavailable: *bad (package bad_attn 0.1*No module named*"])


# -- backends that break the contract at run time -------------------------------------------------------
# (the subclass's body, how the report reads)
MISBEHAVING = {
    "available() returns None (the README's skeleton left as ...)":
        ("    def available(self):\n        ...\n", "usage error",
         "*available() returned None, not an Availability (package pkg_attn 0.1, entry point 'mine = pkg_attn:BAD');"
         " return pytest_attn.Availability(True), or Availability(False, 'why not')*"),
    "available() raises": ("    def available(self):\n        raise OSError('no driver')\n", "usage error",
                           "*available() raised OSError: no driver (package pkg_attn 0.1*"),
    "unsupported() returns None": ("    def unsupported(self, layer, metadata, device='cpu'):\n        pass\n", "failed",
                                   "*unsupported() returned None; it must return a list of reasons*"),
    "unsupported() raises": ("    def unsupported(self, layer, metadata, device='cpu'):\n        raise KeyError('hd')\n",
                             "failed", "*backend 'mine' (package pkg_attn 0.1, entry point 'mine = pkg_attn:BAD') "
                                       "raised in unsupported(): KeyError: 'hd'*"),
    "plan() returns None": ("    def plan(self, metadata, layer, device='cpu'):\n        ...\n", "failed",
                            "*plan() returned None, not a pytest_attn.Plan*"),
    "plan() raises": ("    def plan(self, metadata, layer, device='cpu'):\n        raise RuntimeError('bad plan')\n",
                      "failed", "*raised in plan(): RuntimeError: bad plan. This is a bug in the backend*"),
    "forward() raises": ("    def forward(self, q, k, v, metadata, plan, out=None):\n        raise RuntimeError('oops')\n",
                         "failed", "*raised in forward(): RuntimeError: oops*"),
    "forward() returns another tensor": ("    def forward(self, q, k, v, metadata, plan, out=None):\n"
                                         "        return super().forward(q, k, v, metadata, plan, out.clone())\n",
                                         "failed", "*forward() returned a tensor that is not the `out` buffer it "
                                                   "was given*The contract: write into the `out` it is given*"),
    # issue 17: a view of `out` with another shape passed 4 tests; the shape is named now
    "forward() returns a view of out with another shape": (
        "    def forward(self, q, k, v, metadata, plan, out=None):\n"
        "        return super().forward(q, k, v, metadata, plan, out).view(out.shape[0], -1)\n",
        "failed", "*forward() returned shape (200, 512), expected (200, 8, 64)*"),
    "forward() returns its output in another dtype": (
        "    def forward(self, q, k, v, metadata, plan, out=None):\n"
        "        return super().forward(q, k, v, metadata, plan, out).float()\n",
        "failed", "*forward() returned dtype float32, expected bfloat16*"),
    "forward() returns None": ("    def forward(self, q, k, v, metadata, plan, out=None):\n"
                               "        super().forward(q, k, v, metadata, plan, out)\n",
                               "failed", "*forward() returned None, not a tensor*"),
    "forward() writes into its input": ("    def forward(self, q, k, v, metadata, plan, out=None):\n"
                                        "        k -= k.mean(dim=0, keepdim=True)\n"
                                        "        return super().forward(q, k, v, metadata, plan, out)\n",
                                        "failed", "*modified its input k in place*"),
    "tolerance() returns None": ("    def tolerance(self, dtype):\n        ...\n", "failed",
                                 "*tolerance('bfloat16') returned None, not a pytest_attn.Tolerance*"),
}


@pytest.mark.parametrize("problem", list(MISBEHAVING))
def test_a_backend_breaking_the_contract_fails_or_skips_only_itself(pytester, problem):
    body, outcome, message = MISBEHAVING[problem]
    source = f"\nclass Bad(Good):\n{body}\nBAD = Bad('mine')\n"
    result = run_with(pytester, source, {"mine": "pkg_attn:BAD"}, "--attn-backend=mine,torch", "-rs")
    if outcome == "usage error":  # named and unusable: the run would test nothing of it
        assert_usage_error(result, "ERROR: pytest-attn: --attn-backend=mine cannot be used: " + message)
        unnamed = pytester.runpytest(ONE_CASE, "--attn-backend=all", "-rs")
        unnamed.stdout.fnmatch_lines(["SKIPPED*backend 'mine' is unavailable here: " + message])
        return
    result.assert_outcomes(passed=1, **{outcome: 1})  # torch still passes
    result.stdout.fnmatch_lines([message])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    if outcome == "failed":  # the closing section says how to rerun exactly the failing test
        result.stdout.fnmatch_lines(["*= pytest-attn =*", "mine: 1 failed", "  rerun: python3 -m pytest "
                                     "'*::test_case[[]mine-hd64-ragged[]]' --attn-backend=mine --attn-cases=hd64-ragged "
                                     "--attn-seed=20261125"])
        failure = result.stdout.str().split("= FAILURES =")[1].split("= pytest-attn =")[0]
        assert "pytest_attn/" not in failure and "tensor(" not in failure, failure  # the backend's frames only


def test_two_backends_with_one_name_keep_the_first_and_say_so(pytester):
    result = run_with(pytester, "BACKENDS = [Good('torch')]", {"clash": "pkg_attn:BACKENDS"}, "--attn-backend=torch")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["attn registry: two backends are named 'torch': built in, backends/torch_sdpa.py and "
                                 "package pkg_attn 0.1, entry point 'clash = pkg_attn:BACKENDS'; the second is ignored: "
                                 "rename one"])
