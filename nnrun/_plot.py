"""`nnrun plot`: a sweep's metric (or save) as a line plot or a labelled heatmap."""

from __future__ import annotations

import math
from pathlib import Path

from nnrun.store import load
from nnrun.store._grid import sweep_grid


def plot(
    path: str | Path,
    name: str,
    output: str | Path | None = None,
    *,
    prompt: str | None = None,
    reduce: str = "norm",
) -> Path:
    """Draw one number per sweep point and write the picture (PNG, PDF or SVG by suffix).

    One sweep axis gives a line plot, two a heatmap with a colour bar (diverging
    around 0 when the values have both signs). The default output is
    `<file stem>-<name>.png` next to the results file. Returns the path written.

    >>> nnrun.plot("runs/activation-patching.h5", "logit_diff")   # doctest: +SKIP
    PosixPath('runs/activation-patching-logit_diff.png')
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    results = load(path)
    grid = sweep_grid(results, name, prompt=prompt, reduce=reduce)
    target = (
        Path(output)
        if output is not None
        else Path(path).with_name(f"{Path(path).stem}-{name}.png")
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    title = f"{grid.title} ({grid.prompt})"
    if grid.y is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(grid.x.ticks)), 3.5))
        ax.plot(range(len(grid.x.ticks)), grid.values, marker="o")
        ax.set_ylabel(grid.title)
    else:
        width = max(4.5, 0.7 * len(grid.x.ticks) + 2.5)
        height = max(3.0, 0.22 * len(grid.y.ticks) + 1.5)
        fig, ax = plt.subplots(figsize=(width, height))
        values = np.ma.masked_invalid(grid.values)
        low, high = float(values.min()), float(values.max())
        if low < 0 < high:  # signed effects: white is "no effect"
            bound = max(abs(low), abs(high))
            image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        else:
            image = ax.imshow(values, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, label=grid.title)
        step = max(1, math.ceil(len(grid.y.ticks) / 40))
        ax.set_yticks(range(0, len(grid.y.ticks), step))
        ax.set_yticklabels(grid.y.ticks[::step])
        ax.set_ylabel(grid.y.name)
    ax.set_xticks(range(len(grid.x.ticks)))
    tilted = len(grid.x.ticks) > 6 or max(len(t) for t in grid.x.ticks) > 8
    ax.set_xticklabels(
        grid.x.ticks, rotation=40 if tilted else 0, ha="right" if tilted else "center"
    )
    ax.set_xlabel(grid.x.name)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
