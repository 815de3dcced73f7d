"""The advisor's report kept in the store, where the dashboard reads it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kmodgate.abi.model import ModuleInfo
from kmodgate.advise.advice import Advice, proposed_stablelist
from kmodgate.advise.plots import advice_figures, svg_text
from kmodgate.report import advice_json
from kmodgate.store.db import Store
from kmodgate.store.models import AdviceReport

TOP = 50  # rows of the symbol and churn tables a stored report keeps


def record_advice(store: Store, a: Advice, modules: Sequence[ModuleInfo],
                  now: datetime) -> int:
    """Store the report; its id."""
    figures = {name: svg_text(fig) for name, fig in advice_figures(a, len(modules), TOP).items()}
    row = AdviceReport(recorded_at=now, base=a.base, line=a.line, modules=len(modules),
                       report=advice_json(a, TOP), stablelist=proposed_stablelist(a, modules),
                       survival_svg=figures["survival"], churn_svg=figures["churn"])
    with store.transaction() as session:
        session.add(row)
        session.flush()
        return row.id
