"""Survival and churn figures as PNG and SVG (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kmodgate.advise.survival import SurvivalPoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = ("png", "svg")


def _figure() -> Figure:
    # Imported on demand: matplotlib costs ~0.3 s to import and only plots need it.
    # A bare Figure (not pyplot) needs no display and keeps no global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(8, 4.5))


def plot_survival(points: Sequence[SurvivalPoint], title: str, out_dir: Path) -> list[Path]:
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
    return _save(fig, out_dir / "survival")


def plot_churn(per_subsystem: Sequence[tuple[str, int]], title: str, out_dir: Path) -> list[Path]:
    fig = _figure()
    ax = fig.subplots()
    ax.barh([name for name, _ in per_subsystem][::-1], [n for _, n in per_subsystem][::-1])
    ax.set_xlabel("CRC changes along the line")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out_dir / "churn")


def _save(fig: Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt)
        paths.append(path)
    return paths
