"""Figures of benchmark runs: a grid of panels, two to a row, saved as one image (matplotlib on its
Agg backend: CI runners have no display). bench.compare and bench.history draw into the panels."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def panel_grid(count: int, out, *, panel_height: float, dpi: int) -> Iterator[list]:
    """Yields ``count`` axes, two to a row; on leaving, hides the unused ones and saves the figure
    to ``out`` (its folder made). The path saved is ``Path(out)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, panel_height * rows), squeeze=False)
    try:
        yield list(axes.flat)[:count]
        for ax in list(axes.flat)[count:]:
            ax.set_visible(False)
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
