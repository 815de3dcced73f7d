"""Kernel lines and their order; what each stream holds now.

A *line* is a series and a flavour ("6.1/amd64", "6.12/cloud-amd64"): the
kernels one package name stream upgrades through.  Within a line kernels are
ordered by package version when every kernel has one, else by release
(kmodgate.lines.release_sort_key: 6.1.0-9 < 6.1.0-47).  A stream
holds one current kernel per line: the last one promoted into it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from debian.debian_support import Version
from sqlalchemy import select
from sqlalchemy.orm import Session

from kmodgate.lines import release_sort_key
from kmodgate.store.models import Kernel, Pin, Promotion


class Orderable(Protocol):
    """A kernel row, or a plain value with what ordering reads of one."""

    @property
    def release(self) -> str: ...

    @property
    def package_version(self) -> str | None: ...


def kernel_sort_key(kernel: Orderable, by_package: bool) -> tuple[Any, ...]:
    if by_package and kernel.package_version:
        return (Version(kernel.package_version), release_sort_key(kernel.release))
    return (release_sort_key(kernel.release),)


def sort_kernels(kernels: Iterable[Kernel]) -> list[Kernel]:
    """Oldest first; by package version only if all have one (mixing orders would lie)."""
    items = list(kernels)
    by_package = bool(items) and all(k.package_version for k in items)
    return sorted(items, key=lambda k: kernel_sort_key(k, by_package))


def is_older(candidate: Orderable, than: Orderable) -> bool:
    by_package = bool(candidate.package_version and than.package_version)
    return kernel_sort_key(candidate, by_package) < kernel_sort_key(than, by_package)


def kernels_by_line(session: Session) -> dict[str, list[Kernel]]:
    out: dict[str, list[Kernel]] = {}
    for k in session.scalars(select(Kernel)):
        out.setdefault(k.line, []).append(k)
    return {line: sort_kernels(ks) for line, ks in sorted(out.items())}


def current_promotion(session: Session, stream: str, line: str) -> Promotion | None:
    """The promotion that put the stream's current kernel of *line* in place."""
    return session.scalars(
        select(Promotion)
        .where(Promotion.stream == stream, Promotion.line == line)
        .order_by(Promotion.at.desc(), Promotion.id.desc())
        .limit(1)
    ).first()


class Entry(NamedTuple):
    kernel: str
    at: datetime


@dataclass
class PromotionHistory:
    """Every stream's current kernel per line and every kernel's first entry
    into each stream, from one pass over the promotions (not a query each)."""

    current: dict[tuple[str, str], Entry] = field(default_factory=dict)  # (stream, line)
    entered: dict[tuple[str, str], datetime] = field(default_factory=dict)  # (kernel, stream)


def promotion_history(session: Session) -> PromotionHistory:
    history = PromotionHistory()
    rows = session.execute(select(Promotion.kernel, Promotion.stream, Promotion.line,
                                  Promotion.at).order_by(Promotion.at, Promotion.id))
    for kernel, stream, line, at in rows:
        history.current[(stream, line)] = Entry(kernel, at)  # later rows win
        history.entered.setdefault((kernel, stream), at)
    return history


def current_kernels(session: Session, stream: str) -> dict[str, str]:
    """line -> the kernel the stream holds on that line."""
    out: dict[str, str] = {}
    rows = session.scalars(
        select(Promotion).where(Promotion.stream == stream)
        .order_by(Promotion.at, Promotion.id)
    )
    for p in rows:
        out[p.line] = p.kernel  # later rows win
    return dict(sorted(out.items()))


def first_entry(session: Session, kernel: str, stream: str) -> Promotion | None:
    """When *kernel* first entered *stream*: soak counts from there."""
    return session.scalars(
        select(Promotion)
        .where(Promotion.kernel == kernel, Promotion.stream == stream)
        .order_by(Promotion.at, Promotion.id)
        .limit(1)
    ).first()


def active_pin(session: Session, stream: str, line: str) -> Pin | None:
    return session.scalars(
        select(Pin)
        .where(Pin.stream == stream, Pin.line == line, Pin.removed_at.is_(None))
        .order_by(Pin.id.desc())
        .limit(1)
    ).first()


def active_pins(session: Session, streams: Sequence[str] | None = None) -> list[Pin]:
    query = select(Pin).where(Pin.removed_at.is_(None)).order_by(Pin.stream, Pin.line)
    if streams is not None:
        query = query.where(Pin.stream.in_(streams))
    return list(session.scalars(query))
