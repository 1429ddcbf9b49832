"""What the run tells the user: the report header."""
from __future__ import annotations


def header_lines(session, config=None, suite_line=None) -> list[str]:
    selected = session.selected
    lines = [f"attn backends: {', '.join(b.name for b in selected) or '(none available)'}"
             + ("" if session.requested else " (every available one; choose with --attn-backend)")]
    unavailable = session.unavailable
    if unavailable:
        lines.append("attn unavailable: " + "; ".join(f"{name} ({reason})" for name, reason in unavailable))
    for problem in session.registry.problems:
        lines.append(f"attn registry: {problem}")
    dtypes = ", ".join(session.dtypes) if session.dtypes else "each case's own"
    limit = session.max_tokens
    limit_text = (f"{limit} (larger cases deselected; --attn-max-tokens=0 runs them)" if limit else "none")
    lines.append(f"attn device: {session.describe_device()}")
    lines.append(f"attn dtypes: {dtypes} | seed: {session.seed} (rerun with --attn-seed={session.seed}) | "
                 f"strict: {'on' if session.strict else 'off'} | max tokens: {limit_text}")
    if suite_line:
        lines.append(suite_line)
    if config is not None:
        from pytest_attn.plugin.xdist.gpu_workers import header_lines as gpu_lines
        from pytest_attn.plugin.xdist.schedule import header_line as schedule_line

        lines.extend(gpu_lines(config))
        lines.extend(line for line in [schedule_line(config)] if line)
    return lines
