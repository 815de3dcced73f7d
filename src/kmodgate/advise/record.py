"""The advisor's report kept in the store, where the dashboard reads it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from kmodgate.abi.model import ModuleInfo
from kmodgate.advise.advice import Advice, proposed_stablelist
from kmodgate.advise.plots import advice_figures, svg_text
from kmodgate.report import advice_json
from kmodgate.store.db import Store
from kmodgate.store.models import AdviceReport

TOP = 50  # rows of the symbol, coverage and churn tables a stored report keeps
NAMES = 20  # module or symbol names kept per row


def stored_report(a: Advice) -> dict[str, Any]:
    """The command's JSON, cut to what a page shows.  A whole image as the
    corpus names thousands of modules per symbol and thousands of symbols
    per module: megabytes no reader of the dashboard wants in each request."""
    report = advice_json(a, TOP)
    for row in report["symbols"]:
        row["modules"] = row["modules"][:NAMES]
    # Whether any symbol the corpus uses is listed: the coverage table says nothing otherwise.
    report["stablelist_in_force"] = any(u.stablelisted for u in a.usage)
    report["coverage_total"] = len(report["coverage"])
    report["coverage"] = [{**row, "uncovered": row["uncovered"][:NAMES]}
                          for row in report["coverage"][:TOP]]
    return report


def record_advice(store: Store, a: Advice, modules: Sequence[ModuleInfo],
                  now: datetime) -> int:
    """Store the report; its id."""
    figures = {name: svg_text(fig) for name, fig in advice_figures(a, len(modules), TOP).items()}
    row = AdviceReport(recorded_at=now, base=a.base, line=a.line, modules=len(modules),
                       report=stored_report(a), stablelist=proposed_stablelist(a, modules),
                       survival_svg=figures["survival"], churn_svg=figures["churn"])
    with store.transaction() as session:
        session.add(row)
        session.flush()
        return row.id
