"""Cases as data: a :class:`BatchCase` to and from JSON (its shape and schedule, never tensor values).

A case is one JSON object::

    {"format": 1, "name": "my-case", "layer_spec": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 64},
     "seq_lens": [65, 3], "cache": true, "decode_steps": 2, "tags": ["mine"]}

``layer_spec`` holds the :class:`~pytest_attn.core.layer.LayerSpec` fields that differ from their
defaults (``sinks`` as the list of logits, or ``true`` for :func:`~pytest_attn.cases.case.sink_logits`);
the other keys are the case's own fields, also only where they differ from the default
(``seq_lens`` always). ``layer_overrides`` is a list with one object per layer (``[{"window_left":
127}, {}]``). Both field lists are read off the dataclasses, so a field added to either is written
and read with no change here. ``format`` is the version of this layout (optional when reading).

A file is ``.json`` (one case, or a list of them) or ``.jsonl`` (one case per line); a folder is every
such file in it. Anything wrong is an :class:`AttnInputError` of one line naming the file, the line
(``.jsonl``), the case and the field.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from pytest_attn.cases.case import BatchCase
from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.layer import LayerSpec

FORMAT = 1
FORMAT_KEY = "format"
SUFFIXES = (".json", ".jsonl")
#: Fields that are the case's position in a run, not part of the case (the harness sets layer_idx).
_LAYER_SKIPPED = ("layer_idx",)


# -- writing ------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A JSON value for a field's value: tuples become lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _non_default(obj, skip: Iterable[str] = ()) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if default is dataclasses.MISSING or value != default:
            out[f.name] = _plain(value)
    return out


def case_to_dict(case: BatchCase) -> dict:
    """The case as a JSON-ready dict: the format, its name, its layer and its non-default fields."""
    fields = _non_default(case, skip=("name", "layer_spec", "seq_lens", "layer_overrides"))
    data = {FORMAT_KEY: FORMAT, "name": case.name,
            "layer_spec": _non_default(case.layer_spec, skip=_LAYER_SKIPPED),
            "seq_lens": list(case.seq_lens)}
    if case.layer_overrides:
        data["layer_overrides"] = [{k: _plain(v) for k, v in layer} for layer in case.layer_overrides]
    data.update(fields)
    return data


def case_to_json(case: BatchCase, indent: Optional[int] = None) -> str:
    return json.dumps(case_to_dict(case), indent=indent)


def dump_cases(cases: Iterable[BatchCase], path: Union[str, Path]) -> Path:
    """Write cases to ``path``: ``.jsonl`` one per line, else a JSON list (one case: an object)."""
    path, cases = Path(path), list(cases)
    if path.suffix == ".jsonl":
        text = "".join(case_to_json(c) + "\n" for c in cases)
    else:
        data = case_to_dict(cases[0]) if len(cases) == 1 else [case_to_dict(c) for c in cases]
        text = json.dumps(data, indent=1) + "\n"
    path.write_text(text)
    return path


# -- reading ------------------------------------------------------------------------------------------
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint) -> bool:
    """Whether a JSON value has the type a field's annotation asks for (ints for floats too)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple or origin is tuple:
        if not isinstance(value, list):
            return False
        if args and args[-1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return True
    return True  # a type this reader does not know: the constructor checks the value


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if hint is tuple or typing.get_origin(hint) is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _as_field(value: Any) -> Any:
    return tuple(_as_field(v) for v in value) if isinstance(value, list) else value


class _Where:
    """Where a case came from, for the one-line error: file, line, case, field."""

    def __init__(self, source: str, line: Optional[int] = None, name: Optional[str] = None):
        self.source, self.line, self.name = source, line, name

    def error(self, problem: str, field: Optional[str] = None) -> AttnInputError:
        place = self.source + (f":{self.line}" if self.line is not None else "")
        case = f" case {self.name!r}:" if self.name is not None else ""
        field_text = f" field {field!r}:" if field else ""
        return AttnInputError(f"{place}:{case}{field_text} {problem}")


def _checked_fields(data: dict, cls, skip: Iterable[str], where: _Where, prefix: str = "") -> dict:
    hints, names = _hints(cls), {f.name for f in dataclasses.fields(cls)} - set(skip)
    for key, value in data.items():
        if key not in names:
            known = names if cls is LayerSpec else names | {FORMAT_KEY, *skip}
            raise where.error(f"unknown field; a {'layer' if cls is LayerSpec else 'case'} has "
                              f"{', '.join(sorted(known))}", prefix + key)
        if key == "sinks" and isinstance(value, bool):
            continue  # true: the case's sink_logits
        if not _fits(value, hints[key]):
            raise where.error(f"{value!r} is not {_type_name(hints[key])}", prefix + key)
    return {k: _as_field(v) for k, v in data.items()}


def case_from_dict(data: Any, where: Optional[_Where] = None) -> BatchCase:
    """The case a dict (one JSON object) describes, every field checked (see the module docstring)."""
    where = where or _Where("<case>")
    if not isinstance(data, dict):
        raise where.error(f"a case is a JSON object, got {type(data).__name__}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise where.error("needs a \"name\" (a non-empty string)", "name")
    where.name = name
    data = dict(data)
    version = data.pop(FORMAT_KEY, FORMAT)
    if version != FORMAT:
        raise where.error(f"format {version!r} is not one this pytest-attn reads ({FORMAT})", FORMAT_KEY)
    layer = data.pop("layer_spec", None)
    if not isinstance(layer, dict):
        raise where.error("needs a \"layer_spec\" object (num_heads, num_kv_heads, head_dim, ...)", "layer_spec")
    overrides = data.pop("layer_overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
        raise where.error("is a list with one object per layer", "layer_overrides")
    fields = _checked_fields(data, BatchCase, ("layer_spec", "layer_overrides"), where)
    layer_fields = _checked_fields(layer, LayerSpec, _LAYER_SKIPPED, where, "layer_spec.")
    for override in overrides:
        _checked_fields(override, LayerSpec, _LAYER_SKIPPED, where, "layer_overrides.")
    fields["layer_overrides"] = tuple(tuple((k, _as_field(v)) for k, v in o.items()) for o in overrides)
    try:
        return BatchCase(name, **layer_fields, **{k: v for k, v in fields.items() if k != "name"})
    except (AttnInputError, TypeError, ValueError) as exc:
        problem = str(exc).removeprefix(f"case {name}: ")
        raise where.error(problem) from None


def case_from_json(text: str, source: str = "<json>") -> BatchCase:
    where = _Where(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise where.error(f"not JSON: {exc}") from None
    return case_from_dict(data, where)


def _decode(text: str, source: str, line: Optional[int] = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Where(source, line if line is not None else exc.lineno).error(f"not JSON: {exc.msg}") from None


def cases_in_file(path: Union[str, Path]) -> list[BatchCase]:
    """The cases of one ``.json`` (an object, or a list of them) or ``.jsonl`` (one per line) file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AttnInputError(f"{source}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    if path.suffix == ".jsonl":
        return [case_from_dict(_decode(line, source, n), _Where(source, n))
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    data = _decode(text, source)
    if isinstance(data, list):
        return [case_from_dict(item, _Where(f"{source}[{i}]")) for i, item in enumerate(data)]
    return [case_from_dict(data, _Where(source))]


def case_files(path: Union[str, Path]) -> list[Path]:
    """The files a path names: itself (a .json or .jsonl file), or the ones in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not found:
            raise AttnInputError(f"{path}: the folder holds no .json or .jsonl case file")
        return found
    if not path.exists():
        raise AttnInputError(f"{path}: no such file or folder; give a .json or .jsonl case file, or a folder of them")
    if path.suffix not in SUFFIXES:
        raise AttnInputError(f"{path}: a case file ends in .json (one case or a list) or .jsonl (one case a line)")
    return [path]


def load_cases(paths: Iterable[Union[str, Path]]) -> dict[str, tuple[BatchCase, str]]:
    """name -> (case, the file it came from) for every case of these files and folders. A name given
    twice, or a path that holds no case, is an AttnInputError."""
    found: dict[str, tuple[BatchCase, str]] = {}
    for given in paths:
        before = len(found)
        for path in case_files(given):
            for case in cases_in_file(path):
                if case.name in found:
                    raise AttnInputError(f"{path}: case {case.name!r} is also in {found[case.name][1]}; give each "
                                         "case a name of its own")
                found[case.name] = (case, str(path))
        if len(found) == before:
            raise AttnInputError(f"{given}: holds no case (an empty file or list); a case file must name at "
                                 "least one case")
    return found
