"""Cases as data: every case round-trips through JSON, the exported catalog reloads equal to the
catalog, and anything wrong in a case file is one line naming the file, the line, the case and the field."""
import dataclasses
import json

import pytest

from pytest_attn.cases.case import BatchCase, sink_logits
from pytest_attn.cases.catalog import CATALOG
from pytest_attn.cases.fuzz import TIERS, draw_case
from pytest_attn.cases.serialize import (FORMAT, case_from_dict, case_from_json, case_to_dict, case_to_json,
                                         cases_in_file, dump_cases, load_cases)
from pytest_attn.cli.main import main
from pytest_attn.core.contract import Capabilities
from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.layer import LayerSpec


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_catalog_case_round_trips(name):
    case = CATALOG[name]
    again = case_from_json(case_to_json(case))
    assert again == case and again.layer_spec == case.layer_spec and again.layers() == case.layers()
    assert [s for s in again.steps()] == [s for s in case.steps()]


def test_the_exported_catalog_reloads_equal_to_the_catalog(tmp_path, capsys):
    for suffix in (".json", ".jsonl"):
        path = tmp_path / f"catalog{suffix}"
        assert main(["export-cases", "-o", str(path)]) == 0
        assert {name: case for name, (case, _) in load_cases([path]).items()} == CATALOG
    capsys.readouterr()
    assert main(["export-cases"]) == 0  # to stdout: a JSON list
    listed = json.loads(capsys.readouterr().out)
    assert {case.name: case for case in map(case_from_dict, listed)} == CATALOG


def test_export_to_stdout_is_a_json_list_and_a_filter_picks_cases(capsys):
    assert main(["export-cases", "swa"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == [c.name for c in CATALOG.values() if "swa" in c.tags]
    assert main(["export-cases", "no-such-tag"]) == 4
    assert "unknown case name or tag no-such-tag" in capsys.readouterr().err


def test_only_fields_off_their_defaults_are_written_with_the_format():
    case = BatchCase("plain", 4, 2, 64, (10,))
    assert case_to_dict(case) == {"format": FORMAT, "name": "plain", "seq_lens": [10],
                                  "layer_spec": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 64}}


def test_every_layer_field_is_written_off_its_default():
    """LayerSpec is written field by field from dataclasses.fields: a field set off its default,
    whatever it is, appears and reads back (no list of fields to keep in step)."""
    spec = LayerSpec(8, 2, 64, dtype="float16", mask="full", sm_scale=0.2, window_left=5, logits_soft_cap=20.0,
                     sinks=sink_logits(8), head_dim_vo=32, kv_dtype="float8_e4m3fn", k_scale=0.5, v_scale=0.25,
                     return_lse=True)
    case = BatchCase("all-layer-fields", layer_spec=spec, seq_lens=(9, 3), cache=True, decode_steps=1)
    written = case_to_dict(case)["layer_spec"]
    off_default = {f.name for f in dataclasses.fields(LayerSpec) if getattr(spec, f.name) != f.default}
    assert set(written) == off_default
    assert case_from_json(case_to_json(case)) == case


def test_sinks_true_in_a_file_means_the_cases_sink_logits():
    case = case_from_dict({"name": "s", "layer_spec": {"num_heads": 4, "num_kv_heads": 1, "head_dim": 64,
                                                       "sinks": True}, "seq_lens": [5]})
    assert case.layer_spec.sinks == sink_logits(4)


def test_random_cases_round_trip():
    caps = Capabilities(sliding_window=True, soft_cap=True, sinks=True, head_dim_vo=True, cross_attention=True,
                        chunked_prefill=True, multi_token_generation=True, lse_base="e",
                        kv_dtypes=frozenset({"float8_e4m3fn", "float16"}))
    checked = 0
    for index in range(300):
        try:
            case = draw_case(7, "any", caps, TIERS["nightly"], index)
        except AttnInputError:
            continue
        assert case_from_json(case_to_json(case)) == case, case_to_json(case)
        checked += 1
    assert checked > 200


GOOD = {"name": "mine", "layer_spec": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 64}, "seq_lens": [65, 3]}


def _with(**changes) -> dict:
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key.startswith("spec_"):
            data["layer_spec"][key[len("spec_"):]] = value
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("data, expected", [
    (_with(pages=3), "case 'mine': field 'pages': unknown field"),
    (_with(spec_heads=3), "case 'mine': field 'layer_spec.heads': unknown field"),
    (_with(cache="yes"), "case 'mine': field 'cache': 'yes' is not true or false"),
    (_with(seq_lens=[65, 3.5]), "case 'mine': field 'seq_lens': [65, 3.5] is not a list"),
    (_with(spec_head_dim="64"), "case 'mine': field 'layer_spec.head_dim': '64' is not an integer"),
    (_with(spec_sm_scale="big"), "field 'layer_spec.sm_scale': 'big' is not a number or null"),
    (_with(page_size=0), "case 'mine': page_size must be an int >= 1, got 0"),
    (_with(spec_num_kv_heads=3), "case 'mine': num_heads=4 is not divisible by num_kv_heads=3"),
    (_with(spec_mask="sideways"), "case 'mine': mask 'sideways' is not one of"),
    (_with(format=2), "case 'mine': field 'format': format 2 is not one this pytest-attn reads (1)"),
    (_with(layer_overrides=[{"num_heads": 2}]), "case 'mine': layer_overrides may change"),
    (_with(num_layers=2, layer_overrides=[{}, {"dtype": "fp8"}]), "case 'mine': unsupported dtype 'fp8'"),
    ({"layer_spec": {}, "seq_lens": [1]}, "field 'name': needs a \"name\""),
    ({"name": "x", "seq_lens": [1]}, "case 'x': field 'layer_spec': needs a \"layer_spec\" object"),
    ([1, 2], None),
])
def test_a_bad_case_file_is_one_line_naming_file_case_and_field(tmp_path, data, expected):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AttnInputError) as info:
        cases_in_file(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    if expected:
        assert expected in message, message


def test_a_jsonl_error_names_its_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(_with(name="second", decode_steps=-1)) + "\n")
    with pytest.raises(AttnInputError, match=r"cases\.jsonl:3: case 'second': decode_steps must be an int >= 0"):
        cases_in_file(path)
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(AttnInputError, match=r"cases\.jsonl:2: not JSON"):
        cases_in_file(path)


def test_a_json_list_error_names_its_item(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([GOOD, _with(name="b", tags="x")]))
    with pytest.raises(AttnInputError, match=r"cases\.json\[1\]: case 'b': field 'tags': 'x' is not a list"):
        cases_in_file(path)


def test_folders_files_and_their_problems(tmp_path):
    folder = tmp_path / "cases"
    (folder / "more").mkdir(parents=True)
    dump_cases([CATALOG["hd64-ragged"]], folder / "a.json")
    dump_cases([CATALOG["fp8-kv-mixed"], CATALOG["reuse-window"]], folder / "more" / "b.jsonl")
    (folder / "notes.txt").write_text("not a case")
    loaded = load_cases([folder])
    assert list(loaded) == ["hd64-ragged", "fp8-kv-mixed", "reuse-window"]
    assert loaded["reuse-window"] == (CATALOG["reuse-window"], str(folder / "more" / "b.jsonl"))
    dump_cases([CATALOG["hd64-ragged"]], tmp_path / "again.json")
    with pytest.raises(AttnInputError, match="case 'hd64-ragged' is also in .*a.json; give each case a name"):
        load_cases([folder, tmp_path / "again.json"])
    (tmp_path / "empty.json").write_text("[]")
    for bad, says in ((tmp_path / "empty.json", "holds no case"), (tmp_path / "missing.json", "no such file"),
                      (tmp_path / "cases" / "notes.txt", "ends in .json"), (tmp_path / "more", "no such file")):
        with pytest.raises(AttnInputError, match=says):
            load_cases([bad])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(AttnInputError, match="holds no .json or .jsonl case file"):
        load_cases([tmp_path / "nothing"])
