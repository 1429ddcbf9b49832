"""GPU evidence for kernel traces, determinism and batch invariance (issue 20), in one command:

    python tests/evidence/trace_evidence.py --out DIR [--backends all] [--budget-s 330]

On a GPU with FlashInfer it writes DIR/trace_evidence.md and DIR/trace_evidence.json:

1. kernels per backend x case family (no-cache prefill, paged prefill, decode, mixed, spec-decode):
   the kernels the family's largest batch launched (after a warm-up call), whether they keep the
   backend's declaration (Backend.expected_kernels), and the undeclared ones by name;
2. kernels per backend x catalog case for a few cases (every new plan of the case);
3. CUDA-graph replay: the kernels of the graph decoder's eager call and of its replay, compared;
4. determinism and batch invariance per backend x family, measured bitwise.

Work stops being started once --budget-s seconds have passed (JIT builds on a cold machine take
most of a first run); what did not run is listed as such, never as passed. Results are written after
every backend, so a run that is killed still leaves them. Exit 0 when it ran; the tables carry the
verdicts (a declared property that fails is marked FAILED).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it

CATALOG_CASES = ("vit-1img-224", "hd128-ragged", "llm-decode-gqa-nhd", "llm-mixed-nhd", "spec-decode-q4")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for trace_evidence.md and trace_evidence.json")
    parser.add_argument("--backends", default="all", help="comma list or all (default)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no new work after this (default 330)")
    parser.add_argument("--long", type=int, default=None, help="long requests beside the needle (default 2048 on CUDA)")
    args = parser.parse_args(argv)

    import torch

    from pytest_attn.env.registry import Registry

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    registry = Registry.discover()
    backends = registry.resolve([n for n in args.backends.split(",") if n])
    start = time.monotonic()
    report = {"device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "flashinfer": _flashinfer_version(), "families": [], "cases": [],
              "graph": [], "properties": [], "not_run": [], "errors": []}
    long = args.long or (2048 if device.startswith("cuda") else 96)
    for backend in backends:
        _one_backend(backend, device, long, report, lambda: time.monotonic() - start > args.budget_s)
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        _write(out, report)
    print(f"wrote {out / 'trace_evidence.md'} and {out / 'trace_evidence.json'} in {report['elapsed_s']} s")
    return 0


def _flashinfer_version():
    from pytest_attn.env.packages import flashinfer_version

    return flashinfer_version()


def _one_backend(backend, device, long, report, over_budget) -> None:
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.check.graph_replay import SCENARIOS, trace_graph_decode
    from pytest_attn.check.properties import compose, default_layer, families, measure_batch_invariance, \
        measure_determinism
    from pytest_attn.check.traces import check_trace, compare_replay, trace_case
    from pytest_attn.core import calls as guard
    from pytest_attn.core.contract import Plan
    from pytest_attn.core.errors import UnsupportedCase

    availability = guard.availability(backend)
    if not availability:
        report["not_run"].append({"backend": backend.name, "reason": f"unavailable: {availability.reason}"})
        print(f"{backend.name}: unavailable: {availability.reason}", flush=True)
        return
    name = backend.name
    for family in families(long).values():
        if over_budget():
            report["not_run"].append({"backend": name, "what": f"family {family.name}", "reason": "time budget"})
            continue
        t0 = time.monotonic()
        row = {"backend": name, "family": family.name}
        try:
            row.update(_family_kernels(backend, family, device, compose, default_layer, check_trace))
            det = measure_determinism(backend, family, device=device)
            inv = measure_batch_invariance(backend, family, device=device)
            report["properties"].append({"backend": name, "family": family.name, "deterministic": det.as_dict(),
                                         "batch_invariant": inv.as_dict()})
        except UnsupportedCase as exc:
            row["skipped"] = "; ".join(exc.reasons)
        except Exception as exc:  # a backend that breaks: recorded, the others go on
            row["error"] = f"{type(exc).__name__}: {exc}"
            report["errors"].append({"backend": name, "family": family.name, "traceback": traceback.format_exc()})
        row["seconds"] = round(time.monotonic() - t0, 2)
        report["families"].append(row)
        print(f"{name} {family.name}: {row.get('kernels') or row.get('skipped') or row.get('error')} "
              f"({row['seconds']} s)", flush=True)
    for case_name in CATALOG_CASES:
        if over_budget():
            report["not_run"].append({"backend": name, "what": f"case {case_name}", "reason": "time budget"})
            continue
        entry = {"backend": name, "case": case_name}
        try:
            steps = trace_case(backend, CATALOG[case_name], device=device)
            entry["steps"] = [s.as_dict() | {"summary": s.trace.summary()} for s in steps]
        except UnsupportedCase as exc:
            entry["skipped"] = "; ".join(exc.reasons)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        report["cases"].append(entry)
    if over_budget():
        report["not_run"].append({"backend": name, "what": "graph replay", "reason": "time budget"})
        return
    entry = {"backend": name}
    try:
        eager, replay, plan = trace_graph_decode(backend, SCENARIOS["decode-gqa4-hd128"], device=device)
        declared = guard.call(backend, "expected_kernels", plan) if isinstance(plan, Plan) else None
        entry.update(eager=eager.summary(), replay=replay.summary(), differences=compare_replay(eager, replay),
                     replay_vs_declaration=check_trace(replay, declared), eager_trace=eager.as_dict(),
                     replay_trace=replay.as_dict())
    except UnsupportedCase as exc:
        entry["skipped"] = "; ".join(exc.reasons)
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
    report["graph"].append(entry)


def _family_kernels(backend, family, device, compose, default_layer, check_trace) -> dict:
    """The kernels of one warm forward of the family's largest batch, against the declaration."""
    from pytest_attn.check.case_steps import forward_once
    from pytest_attn.check.traces import as_families, expected_kernels, record

    layer = default_layer(device)
    batch = compose(family.largest(), layer, cache=family.cache, device=device, page_size=family.page_size)
    found = {}

    def around(index, plan, call):
        call()  # warm
        found["trace"] = record(call, device)
        found["plan"] = plan

    forward_once(backend, batch.q, batch.k, batch.v, batch.metadata, layer, device, around)
    declared = as_families(expected_kernels(backend, found["plan"]))
    problems = check_trace(found["trace"], declared)
    return {"plan": found["plan"].describe(), "kernels": found["trace"].summary(),
            "declared": None if declared is None else [f.name for f in declared], "problems": problems,
            "trace": found["trace"].as_dict()}


def _write(out: Path, report: dict) -> None:
    (out / "trace_evidence.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# Kernel traces, determinism, batch invariance: {report['gpu']}",
             f"torch {report['torch']}, flashinfer {report['flashinfer']}, device {report['device']}, "
             f"{report.get('elapsed_s', 0)} s", "",
             "## Kernels per backend x case family (largest batch of the family, warm)", "",
             "| backend | family | plan | kernels | declaration |", "| --- | --- | --- | --- | --- |"]
    for r in report["families"]:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['backend']} | {r['family']} | | {'n/a: ' + r.get('skipped', '') if 'skipped' in r else 'ERROR: ' + r['error']} | |")
            continue
        verdict = ("not declared" if r["declared"] is None else "kept" if not r["problems"] else
                   "BROKEN: " + "; ".join(r["problems"]))
        lines.append(f"| {r['backend']} | {r['family']} | {r['plan']} | {r['kernels']} | {verdict} |".replace("\n", " "))
    lines += ["", "## Determinism and batch invariance (bitwise)", "",
              "| backend | family | deterministic | batch-invariant | differences |", "| --- | --- | --- | --- | --- |"]
    for p in report["properties"]:
        cells = []
        for key in ("deterministic", "batch_invariant"):
            m = p[key]
            cells.append("n/a" if m["holds"] is None else ("yes" if m["holds"] else "NO")
                         + (" (declared: FAILED)" if m["failed"] else " (declared)" if m["declared"] else ""))
        diffs = "; ".join((p["deterministic"]["differences"] + p["batch_invariant"]["differences"])[:2])
        lines.append(f"| {p['backend']} | {p['family']} | {cells[0]} | {cells[1]} | {diffs} |")
    lines += ["", "## Catalog cases: kernels per plan", "", "| backend | case | step: plan: kernels (problems) |",
              "| --- | --- | --- |"]
    for c in report["cases"]:
        text = (c.get("skipped") and "n/a: " + c["skipped"]) or (c.get("error") and "ERROR: " + c["error"]) or \
            "<br>".join(f"{s['step']}: {s['plan']}: {s['summary']}" + (f" ({'; '.join(s['problems'])})" if s["problems"]
                                                                        else "") for s in c["steps"])
        lines.append(f"| {c['backend']} | {c['case']} | {text} |")
    lines += ["", "## CUDA-graph replay (decode-gqa4-hd128)", "", "| backend | eager | replay | same? |",
              "| --- | --- | --- | --- |"]
    for g in report["graph"]:
        if "skipped" in g or "error" in g:
            lines.append(f"| {g['backend']} | {g.get('skipped') or 'ERROR: ' + g['error']} | | |")
            continue
        same = "yes" if not g["differences"] else "NO: " + "; ".join(g["differences"])
        if g["replay_vs_declaration"]:
            same += "; declaration: " + "; ".join(g["replay_vs_declaration"])
        lines.append(f"| {g['backend']} | {g['eager']} | {g['replay']} | {same} |")
    if report["not_run"]:
        lines += ["", "## Not run", ""] + [f"- {n['backend']}: {n.get('what', 'all')}: {n['reason']}"
                                           for n in report["not_run"]]
    if report["errors"]:
        lines += ["", f"## Errors ({len(report['errors'])}; tracebacks in the JSON)", ""] + \
            [f"- {e['backend']} {e['family']}: {e['traceback'].strip().splitlines()[-1]}" for e in report["errors"]]
    (out / "trace_evidence.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
