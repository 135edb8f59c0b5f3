"""Figures for MLflow artifacts: matplotlib on its file-only backend (stages run on nodes without a display), and a
finished figure as PNG bytes."""

from __future__ import annotations

import io
from typing import Any


def subplots(*grid: int, **options: Any) -> tuple[Any, Any]:
    """``pyplot.subplots(*grid, **options)`` on the Agg backend: the figure and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(*grid, **options)


def png_bytes(figure: Any) -> bytes:
    """``figure`` laid out and encoded as PNG; the figure is closed (pyplot keeps every open one alive)."""
    from matplotlib import pyplot

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()
