"""Rendering a run's report, and ``pytest-attn report``.

A report is rendered from a run's data (:mod:`pytest_attn.report.model` computes what it shows)
with the Jinja2 templates in ``pytest_attn/report/templates``: ``.html`` is one self-contained page (its
style inline, the benchmark plot embedded as a PNG data URI, no script and nothing fetched),
``.md`` is GitHub Markdown (its plot, when benchmarks ran, written beside it as ``NAME.png``),
``.json`` is the run's data itself with the matrix added for tools. The plot is
:func:`pytest_attn.bench.compare.draw_panels`'s, the one ``pytest-attn seed-table --plot`` draws.

``pytest-attn report RUN.json`` rebuilds a report from a saved ``.json`` (or from a
pytest-benchmark file); ``pytest-attn report A.json B.json`` puts two runs side by side, the cells
that changed marked.
"""
from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path
from typing import Optional

from pytest_attn.report.model import (ALL_ROW, MARKS, NO_BACKEND, REPORT_SUFFIXES, ReportError, RunView, build, compare_runs,
                           env_rows, load_run, matrix_json, run_label, run_line, with_benchmarks)

TEMPLATES = Path(__file__).resolve().parent / "templates"
MD_FAILURES_SHOWN = 30  # a Markdown report goes in a pull-request comment, which GitHub caps at 65536 characters


# -- the template engine --------------------------------------------------------------------------
def _md_cell(value) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _ms(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-") or "x"


def _templates(html: bool):
    import jinja2

    from pytest_attn.bench.compare import REGIME_TITLES

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=html, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters.update(md=_md_cell, ms=_ms, anchor=_anchor, format_ref=lambda number: f"F{number}",
                       extract=lambda key, container: container[key],
                       index_by_number=lambda notes: {n.number: n for n in notes})
    env.globals.update(MARKS=MARKS, ALL_ROW=ALL_ROW, NO_BACKEND=NO_BACKEND, REGIME_TITLES=REGIME_TITLES,
                       MD_FAILURES_SHOWN=MD_FAILURES_SHOWN)
    return env


def _css(*names: str) -> str:
    return "\n".join((TEMPLATES / name).read_text(encoding="utf-8") for name in names)


def format_of(path: Path) -> str:
    fmt = REPORT_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise ReportError(f"{path}: the suffix picks the format; use {', '.join(sorted(set(REPORT_SUFFIXES)))}")
    return fmt


# -- one run --------------------------------------------------------------------------------------
def plot_png(view: RunView) -> Optional[bytes]:
    """The benchmark plot (µs per token against seq_len, one panel per series and regime), or None."""
    if view.bench is None or not view.bench.panels:
        return None
    import tempfile

    from pytest_attn.bench.compare import draw_panels

    with tempfile.TemporaryDirectory(prefix="attn-report-") as folder:
        return draw_panels(view.bench.panels, Path(folder) / "plot.png").read_bytes()


def render_text(data: dict, fmt: str, plot_target: Optional[str] = None) -> str:
    """The report of one run's data as ``fmt`` (html, md or json). For md, ``plot_target`` is
    where its plot's PNG is (the image's link); html embeds the plot."""
    view = build(data)
    if fmt == "json":
        return json.dumps({**data, "matrix": matrix_json(view)}, indent=1, default=str) + "\n"
    if fmt == "html":
        png = plot_png(view)
        plot = f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}" if png else None
        return _templates(True).get_template("run.html.j2").render(
            view=view, env_rows=env_rows(view.env), run_line=run_line(view.env), plot=plot,
            css=_css("matrix.css", "page.css"))
    return _templates(False).get_template("run.md.j2").render(view=view, env_rows=env_rows(view.env),
                                                              run_line=run_line(view.env), plot=plot_target)


def render_run(data: dict, path: Path) -> Path:
    """Write the report of one run's data to ``path``, in the format its suffix names."""
    path, fmt = Path(path), format_of(path)
    plot_target = None
    if fmt == "md":
        png = plot_png(build(data))
        if png:
            plot_file = path.with_suffix(".png")
            plot_file.write_bytes(png)
            plot_target = plot_file.name
    path.write_text(render_text(data, fmt, plot_target), encoding="utf-8")
    return path


def matrix_fragment(data: dict) -> str:
    """The matrix with its legend and skip reasons, as HTML for another report (pytest-html)."""
    return _templates(True).get_template("fragment.html.j2").render(view=build(data), css=_css("matrix.css"))


# -- two runs -------------------------------------------------------------------------------------
def render_comparison(a: dict, b: dict, labels: tuple[str, str], fmt: str) -> str:
    diff = compare_runs(a, b, labels)
    if fmt == "json":
        cells = [{"row": label, "backend": backend, "a": d.a.text() if d.a else None,
                  "b": d.b.text() if d.b else None}
                 for label, per in diff.rows for backend, d in per.items() if d.changed]
        return json.dumps({"format": "pytest-attn-report-comparison", "labels": list(labels), "changed_cells": cells,
                           "changed_tests": [vars(c) for c in diff.changes],
                           "environment": [{"field": f, "a": x, "b": y} for f, x, y in diff.env]},
                          indent=1) + "\n"
    html = fmt == "html"
    return _templates(html).get_template("compare.html.j2" if html else "compare.md.j2").render(
        diff=diff, css=_css("matrix.css", "page.css") if html else "")


# -- pytest-attn report ---------------------------------------------------------------------------
def add_report_parser(subparsers) -> None:
    report = subparsers.add_parser(
        "report", help="a run's report from saved results, or two runs side by side",
        description="Rebuilds the report of a run from the .json that --attn-report wrote (or from a pytest-benchmark "
                    "file), or puts two runs side by side (two commits, two GPUs, two library versions) with the "
                    "cells that changed marked. The output's suffix picks the format: .html (one self-contained "
                    "file), .md or .json; without --output, Markdown goes to stdout.")
    report.add_argument("runs", nargs="+", metavar="RUN.json",
                        help="a report .json (pytest --attn-report=RUN.json) or a pytest-benchmark .json; two: side "
                             "by side (A, then B)")
    report.add_argument("-o", "--output", default=None, metavar="PATH", help="where to write (.html, .md or .json)")
    report.add_argument("--benchmarks", nargs="+", default=None, metavar="PATH",
                        help="pytest-benchmark files or folders (.benchmarks) whose pytest-attn rows become the run's "
                             "benchmark section (one run only)")
    report.add_argument("--labels", default=None, metavar="A,B", help="names of the two runs (default: their GPU, "
                                                                      "commit and torch)")


def report_command(args) -> int:
    try:
        return _report(args)
    except ReportError as exc:
        print(f"pytest-attn report: {exc}", file=sys.stderr)
        return 4  # a bad argument: one line, as every pytest-attn command says it (cli.USAGE)


def _report(args) -> int:
    if len(args.runs) > 2:
        raise ReportError(f"{len(args.runs)} runs given: give one run, or two to put side by side")
    if args.benchmarks and len(args.runs) != 1:
        raise ReportError("--benchmarks adds benchmark rows to one run; give one RUN.json with it")
    runs = [load_run(path) for path in args.runs]
    if args.benchmarks:
        runs[0] = with_benchmarks(runs[0], args.benchmarks)
    out = Path(args.output) if args.output else None
    fmt = format_of(out) if out else "md"
    if len(runs) == 2:
        labels = _labels(args, runs)
        text = render_comparison(runs[0], runs[1], labels, fmt)
    elif out is not None:
        render_run(runs[0], out)
        print(f"pytest-attn report: {out}")
        return 0
    else:
        text = render_text(runs[0], fmt)
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"pytest-attn report: {out}")
    return 0


def _labels(args, runs: list[dict]) -> tuple[str, str]:
    if args.labels:
        parts = [p.strip() for p in args.labels.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ReportError(f"--labels={args.labels}: give two names, A,B")
        return parts[0], parts[1]
    a, b = (run_label(run, Path(path).stem) for run, path in zip(runs, args.runs))
    if a == b:  # the same GPU, commit and torch: the files tell them apart
        a, b = Path(args.runs[0]).stem, Path(args.runs[1]).stem
    return a, b
