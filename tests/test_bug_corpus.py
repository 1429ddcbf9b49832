"""docs/bug-corpus.md resolves what the catalog and its bug-class tests cite.

pytest_attn/cases/catalog.py and tests/test_bug_classes.py cite corpus bugs as a bare ``#N`` and
dimensions as ``DN``, and upstream threads with their repository ("flashinfer #4299", "sglang PR
#31501"). Each bare code must have an entry in the document, each upstream thread a link there,
and every case and mutation test the document names must exist: a citation without an entry, or
an entry naming a case that was renamed, fails here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_attn.cases.catalog import CATALOG

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "docs" / "bug-corpus.md"
BUG_CLASSES = ROOT / "tests" / "test_bug_classes.py"
CITING = ("pytest_attn/cases/catalog.py", "tests/test_bug_classes.py")

#: How the sources name a repository before "#N", and its GitHub owner/name (the longer name first
#: where one ends another: "mini-sglang" before "sglang").
REPOS = {
    "flashinfer": "flashinfer-ai/flashinfer",
    "tensorrt-llm": "NVIDIA/TensorRT-LLM",
    "trt-llm": "NVIDIA/TensorRT-LLM",
    "mini-sglang": "sgl-project/mini-sglang",
    "sglang": "sgl-project/sglang",
    "vllm": "vllm-project/vllm",
    "flash-attention": "Dao-AILab/flash-attention",
    "pytorch": "pytorch/pytorch",
    "cudnn-frontend": "NVIDIA/cudnn-frontend",
    "mlc-llm": "mlc-ai/mlc-llm",
    "aiter": "ROCm/aiter",
}
#: "#N", optionally after a repository and/or "PR"/"issue": with either it names an upstream
#: thread, with neither a corpus bug.
NUMBER_REF = re.compile(r"(?:(?<![\w-])(?P<repo>" + "|".join(map(re.escape, REPOS)) + r")\s+)?"
                        r"(?:\b(?P<kind>PR|issue)\s+)?#(?P<number>\d+)\b", re.IGNORECASE)
DIMENSION_REF = re.compile(r"\bD(\d+)\b")
LINK = re.compile(r"\]\(https://github\.com/([\w.-]+/[\w.-]+)/(?:issues|pull)/(\d+)\)")
BACKTICKED = re.compile(r"`([^`\n]+)`")
CASE_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)+")  # catalog names: lower case, hyphenated
TEST_NAME = re.compile(r"test_\w+")
FIELD = re.compile(r"^- \*\*(\w[\w ]*)\*\*: ?(.*(?:\n  .*)*)", re.MULTILINE)


@dataclass(frozen=True)
class Entry:
    heading: str  # the text after "### "
    fields: dict  # "Class", "Upstream", "Dimensions", "Cases", "Shown by", "Bugs", "Matrix" -> text


@dataclass(frozen=True)
class Corpus:
    bugs: dict  # N -> Entry, from "### #N: ..."
    dimensions: dict  # N -> Entry, from "### DN: ..."
    others: tuple  # the "also seen" entries
    links: frozenset  # (owner/name, number) of every GitHub issue or PR link

    @classmethod
    def parse(cls, text: str) -> "Corpus":
        bugs, dimensions, others = {}, {}, []
        for section in re.split(r"^### ", text, flags=re.MULTILINE)[1:]:
            heading, _, body = section.partition("\n")
            entry = Entry(heading, {name: value for name, value in FIELD.findall(body)})
            if m := re.match(r"#(\d+): ", heading):
                assert int(m[1]) not in bugs, f"two entries for #{m[1]}"
                bugs[int(m[1])] = entry
            elif m := re.match(r"D(\d+): ", heading):
                assert int(m[1]) not in dimensions, f"two entries for D{m[1]}"
                dimensions[int(m[1])] = entry
            else:
                others.append(entry)
        links = frozenset((repo.lower(), int(n)) for repo, n in LINK.findall(text))
        return cls(bugs, dimensions, tuple(others), links)

    def links_to(self, repo: str | None, number: int) -> bool:
        if repo is None:  # "PR #31501": its repository is named earlier in the sentence
            return any(n == number for _, n in self.links)
        return (REPOS[repo.lower()].lower(), number) in self.links


def unresolved(text: str, corpus: Corpus) -> list[str]:
    """The citations in ``text`` that ``corpus`` does not resolve: a bare #N without an entry, a
    DN without an entry, an upstream thread without a link."""
    missing = []
    for m in NUMBER_REF.finditer(text):
        number = int(m["number"])
        if m["repo"] is None and m["kind"] is None:
            if number not in corpus.bugs:
                missing.append(f"#{number}")
        elif not corpus.links_to(m["repo"], number):
            missing.append(m[0])
    missing += [f"D{n}" for n in map(int, DIMENSION_REF.findall(text)) if n not in corpus.dimensions]
    return missing


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return CORPUS.read_text()


@pytest.fixture(scope="module")
def corpus(corpus_text) -> Corpus:
    return Corpus.parse(corpus_text)


@pytest.mark.parametrize("source", CITING)
def test_every_code_and_thread_cited_resolves(source, corpus):
    text = (ROOT / source).read_text()
    assert NUMBER_REF.search(text) and DIMENSION_REF.search(text), f"{source} cites nothing: is this test stale?"
    missing = unresolved(text, corpus)
    assert not missing, (f"{source} cites {', '.join(sorted(set(missing)))}, which docs/bug-corpus.md does not "
                         "resolve: add the entry (### #N or ### DN) or the thread's link there, or cite an "
                         "upstream thread with its repository (\"flashinfer #4299\")")


@pytest.mark.parametrize("source", CITING)
def test_no_source_points_at_the_research_notes(source):
    assert "shared/research" not in (ROOT / source).read_text(), f"{source}: cite docs/bug-corpus.md instead"


def test_every_case_the_document_names_is_in_the_catalog(corpus_text):
    names = {t for t in BACKTICKED.findall(corpus_text) if CASE_NAME.fullmatch(t)}
    assert len(names) > 40, names  # the entries name cases in backticks
    unknown = sorted(names - set(CATALOG))
    assert not unknown, f"docs/bug-corpus.md names cases the catalog does not have: {unknown}"


def test_every_mutation_test_the_document_names_exists(corpus_text):
    named = {t for t in BACKTICKED.findall(corpus_text) if TEST_NAME.fullmatch(t)}
    defined = set(re.findall(r"^def (test_\w+)\(", BUG_CLASSES.read_text(), flags=re.MULTILINE))
    assert named and not sorted(named - defined), (
        f"docs/bug-corpus.md names tests tests/test_bug_classes.py does not define: {sorted(named - defined)}")


def test_every_bug_entry_has_its_fields(corpus):
    assert len(corpus.bugs) >= 40 and sorted(corpus.bugs) == list(range(1, len(corpus.bugs) + 1)), (
        "the corpus numbers its bugs #1, #2, ... without gaps (a code, once cited, keeps its meaning)")
    for number, entry in corpus.bugs.items():
        for name in ("Class", "Upstream", "Dimensions", "Cases"):
            assert entry.fields.get(name, "").strip(), f"#{number} has no {name}"
        assert LINK.search(entry.fields["Upstream"]), f"#{number}: Upstream links no thread"
    for entry in corpus.others:
        assert LINK.search(entry.fields.get("Upstream", "")) and entry.fields.get("Cases"), entry.heading


def test_bugs_and_dimensions_name_each_other(corpus):
    """A bug filed under DN is listed under DN, and the other way round."""
    assert len(corpus.dimensions) >= 26 and sorted(corpus.dimensions) == list(range(1, len(corpus.dimensions) + 1))
    bug_to_dims = {n: {int(d) for d in DIMENSION_REF.findall(e.fields["Dimensions"])}
                   for n, e in corpus.bugs.items()}
    dim_to_bugs = {d: {int(b) for b in re.findall(r"#(\d+)", e.fields["Bugs"])} for d, e in corpus.dimensions.items()}
    for n, dims in bug_to_dims.items():
        assert dims and dims <= set(corpus.dimensions), f"#{n}: {dims}"
        for d in dims:
            assert n in dim_to_bugs[d], f"#{n} is filed under D{d}, whose Bugs do not list it"
    for d, bugs in dim_to_bugs.items():
        for n in bugs:
            assert d in bug_to_dims.get(n, ()), f"D{d} lists #{n}, whose Dimensions do not name D{d}"


# -- the check fails on planted citations ----------------------------------------------------------
PLANTED = Corpus.parse("""
### #1: a bug
- **Upstream**: [flashinfer #4299](https://github.com/flashinfer-ai/flashinfer/issues/4299),
  [sglang PR #31501](https://github.com/sgl-project/sglang/pull/31501)

### D4: a dimension
""")


@pytest.mark.parametrize("text, missing", [
    ("(D4: #1; flashinfer #4299, sglang PR #31501, PR #31501)", []),
    ("rows #1 and #2 (D4, D5)", ["#2", "D5"]),
    ("flashinfer #9", ["flashinfer #9"]),  # a corpus number given a repository
    ("sglang #4299", ["sglang #4299"]),  # the right number, the wrong repository
    ("PR #12911 and TRT-LLM PR #13190", ["PR #12911", "TRT-LLM PR #13190"]),
    ("the #13190 bug", ["#13190"]),  # an upstream number cited bare reads as a corpus code
    ("mini-sglang PR #31501", ["mini-sglang PR #31501"]),
])
def test_unresolved_citations_are_reported(text, missing):
    assert unresolved(text, PLANTED) == missing
