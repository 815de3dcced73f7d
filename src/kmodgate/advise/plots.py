"""Survival and churn figures (matplotlib, no display needed): PNG and SVG
files for the command, SVG text for the store and the dashboard."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kmodgate.advise.advice import Advice
from kmodgate.advise.survival import SurvivalPoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = ("png", "svg")


def _figure() -> Figure:
    # Imported on demand: matplotlib costs ~0.3 s to import and only plots need it.
    # A bare Figure (not pyplot) needs no display and keeps no global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(8, 4.5))


def survival_figure(points: Sequence[SurvivalPoint], title: str) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    xs = [p.release for p in points]
    ax.plot(xs, [100 * p.share for p in points], marker="o", label="as shipped")
    ax.plot(xs, [100 * p.share_if_kept for p in points], marker="s", linestyle="--",
            label="had the proposed stablelist been kept")
    ax.set_ylim(0, 105)
    ax.set_ylabel("modules that still load (%)")
    ax.set_title(title)
    ax.legend(loc="center right")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def churn_figure(per_subsystem: Sequence[tuple[str, int]], title: str) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    ax.barh([name for name, _ in per_subsystem][::-1], [n for _, n in per_subsystem][::-1])
    ax.set_xlabel("CRC changes along the line")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig: Figure, stem: Path) -> list[Path]:
    """*stem*.png and *stem*.svg."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt)
        paths.append(path)
    return paths


def svg_text(fig: Figure) -> str:
    # matplotlib escapes every label it writes, so a symbol or release name
    # cannot smuggle markup into the picture.
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    return buffer.getvalue()


def advice_figures(a: Advice, corpus: int, top: int) -> dict[str, Figure]:
    """The advice's figures by name: what `advise --plots` writes and the
    dashboard shows."""
    return {
        "survival": survival_figure(a.survival, f"Survival of {corpus} modules built for "
                                                f"{a.base}"),
        "churn": churn_figure(a.churn[a.line].subsystem_changes(a.reference).most_common(top),
                              f"CRC churn along {a.line}"),
    }
