"""The backend author's surface is a deliberate edit: the names ``pytest_attn`` exports and the
signatures, fields and properties a backend author calls are snapshotted in tests/api_surface.txt.
A change fails here until the snapshot is regenerated and CHANGELOG.md says what changed (issue 22:
compare_with_reference's signature once changed without notice). docs/api.md lists the same.

Regenerate after a deliberate change:  python tests/test_api_surface.py --update
"""
import dataclasses
import inspect
import pathlib
import re
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SNAPSHOT = pathlib.Path(__file__).with_name("api_surface.txt")
API_DOC = ROOT / "docs" / "api.md"
CHANGELOG = ROOT / "CHANGELOG.md"

#: (module, class or function) a backend author calls, beyond the classes pytest_attn exports.
EXTRA = (("pytest_attn.check.reference", "as_stored_in_cache"), ("pytest_attn.check.reference", "Comparison"))


def _default(value) -> str:
    if isinstance(value, frozenset):  # a set's repr order follows string hashing, which varies per run
        return "frozenset({" + ", ".join(repr(v) for v in sorted(value, key=repr)) + "})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={_default(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"
    return repr(value)


def _signature(obj) -> str:
    sig = inspect.signature(obj)
    params = []
    for p in sig.parameters.values():
        text = str(p.replace(default=inspect.Parameter.empty))
        if p.default is not inspect.Parameter.empty:
            text += " = " + _default(p.default) if p.annotation is not inspect.Parameter.empty else "=" + _default(
                p.default)
        params.append(text)
    rendered, star = [], False
    kinds = [p.kind for p in sig.parameters.values()]
    for text, kind in zip(params, kinds):
        if kind is inspect.Parameter.KEYWORD_ONLY and not star:
            rendered.append("*")
            star = True
        if kind is inspect.Parameter.VAR_POSITIONAL:
            star = True
        rendered.append(text)
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation}"
    return f"({', '.join(rendered)}){ret}"


def _class_lines(name: str, cls) -> list:
    lines = [f"class {name}"]
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            default = ("" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                       else " = " + (_default(f.default) if f.default is not dataclasses.MISSING else "<factory>"))
            lines.append(f"{name}.{f.name}: {f.type}{default}  [field]")
    elif cls.__init__ is not object.__init__ and "__init__" in vars(cls):
        lines.append(f"{name}.__init__{_signature(cls.__init__)}")
    for attr, value in sorted(vars(cls).items()):
        if attr.startswith("_"):
            continue
        if isinstance(value, property):
            lines.append(f"{name}.{attr}  [property]")
        elif isinstance(value, (classmethod, staticmethod)):
            lines.append(f"{name}.{attr}{_signature(getattr(cls, attr))}  [{type(value).__name__}]")
        elif inspect.isfunction(value):
            lines.append(f"{name}.{attr}{_signature(value)}")
        elif not dataclasses.is_dataclass(cls) and not callable(value):
            lines.append(f"{name}.{attr} = {_default(value)}  [class attribute]")
    return lines


def surface() -> list:
    """The lines of the snapshot: __all__, then each exported (and EXTRA) class or function."""
    import importlib

    import pytest_attn

    lines = ["__all__ = " + ", ".join(pytest_attn.__all__)]
    objects = [(name, getattr(pytest_attn, name)) for name in pytest_attn.__all__]
    objects += [(name, getattr(importlib.import_module(module), name)) for module, name in EXTRA]
    for name, obj in objects:
        if inspect.isclass(obj):
            if issubclass(obj, BaseException) and "__init__" not in vars(obj):
                lines.append(f"class {name}({', '.join(b.__name__ for b in obj.__bases__)})")
            else:
                lines += _class_lines(name, obj)
        elif callable(obj):
            lines.append(f"def {name}{_signature(obj)}")
        else:
            lines.append(f"{name}: {type(obj).__name__}")
    return lines


def _explain(expected: list, got: list) -> str:
    removed = [line for line in expected if line not in got]
    added = [line for line in got if line not in expected]
    return ("the backend author's API changed:\n" + "".join(f"  - {line}\n" for line in removed)
            + "".join(f"  + {line}\n" for line in added)
            + "If this is deliberate: update the snapshot (python tests/test_api_surface.py --update), add a "
              "CHANGELOG.md line under 'Unreleased' saying what changed for backend authors, update docs/api.md, "
              "and keep a removed or renamed name as a deprecated alias that warns for one release.")


def test_the_api_surface_matches_its_snapshot():
    expected = SNAPSHOT.read_text().splitlines()
    got = surface()
    assert got == expected, _explain(expected, got)


def test_a_changed_signature_fails_with_what_to_do(monkeypatch):
    import pytest_attn.check.harness as harness

    def compare_with_reference(backend, out, q, keys, values, metadata, layer):  # the form before 0.2
        pass

    monkeypatch.setattr(harness, "compare_with_reference", compare_with_reference)
    got = surface()
    assert got != SNAPSHOT.read_text().splitlines()
    message = _explain(SNAPSHOT.read_text().splitlines(), got)
    assert "+ def compare_with_reference(backend, out, q, keys, values, metadata, layer)" in message
    assert "update the snapshot" in message and "CHANGELOG.md" in message


def _documented_names() -> list:
    """Every exported name and every Class.member of the snapshot."""
    names = []
    for line in SNAPSHOT.read_text().splitlines()[1:]:
        match = re.match(r"(?:class |def )?([A-Za-z_][\w.]*)", line)
        names.append(match.group(1))
    return sorted(set(names))


def test_docs_api_lists_every_name_and_member_of_the_surface():
    text = API_DOC.read_text()
    missing = [name for name in _documented_names() if not re.search(rf"`{re.escape(name.split('.')[-1])}\b", text)]
    assert not missing, f"docs/api.md does not mention {missing}: document them there"


def test_the_changelog_has_an_unreleased_section_naming_each_deprecation():
    text = CHANGELOG.read_text()
    assert re.search(r"^## Unreleased", text, re.M)
    for deprecated in ("kv_indptr", "compare_with_reference"):
        assert deprecated in text


def test_an_exported_name_keeps_its_meaning_whatever_was_imported_first():
    import pytest_attn
    import pytest_attn.bench.compare  # noqa: F401  (the saved-runs module, once pytest_attn.compare)
    from pytest_attn.check.reference import compare

    assert pytest_attn.compare is compare


def test_deprecated_names_still_work_and_warn():
    from pytest_attn import AttentionMetadata

    md = AttentionMetadata.ragged([3, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert md.kv_indptr == (0, 3, 5)
    assert [w.category.__name__ for w in caught] == ["AttnDeprecationWarning"]
    assert issubclass(caught[0].category, DeprecationWarning)


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_api_surface.py --update")
    SNAPSHOT.write_text("\n".join(surface()) + "\n")
    print(f"wrote {SNAPSHOT}: now add a CHANGELOG.md line for the change")
