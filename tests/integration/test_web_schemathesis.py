"""Schemathesis against the OpenAPI document the application publishes: every
operation, with generated valid and invalid input, never gets a server error,
and every error it does get is a problem document.

Bounded so it stays quick: a few dozen examples per operation, no shrinking
past what Hypothesis does by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from web_fixtures import TOKEN, Scenario, live_server, make_app, make_scenario

pytestmark = pytest.mark.integration

EXAMPLES = 30


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[Scenario]:
    s = make_scenario(tmp_path)
    yield s
    s.gate.close()


@pytest.mark.parametrize("authorized", [True, False], ids=["token", "anonymous"])
def test_no_server_error_anywhere(scenario: Scenario, authorized: bool) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else {}
    failures: list[str] = []
    with live_server(make_app(scenario)) as base:
        schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case: schemathesis.Case) -> None:
                response = case.call(base_url=base, headers=headers, timeout=10)
                label = f"{case.method} {case.formatted_path} -> {response.status_code}"
                if response.status_code >= 500:
                    failures.append(f"{label}: {response.text[:300]}")
                elif response.status_code >= 400 and response.status_code != 405:
                    # Schemathesis keeps every value of a header: a list.
                    values = response.headers.get("content-type") or [""]
                    content_type = values[0] if isinstance(values, list) else values
                    if content_type != "application/problem+json":
                        failures.append(f"{label}: not a problem document ({content_type})")
                    elif "Traceback" in response.text:
                        failures.append(f"{label}: a traceback reached the client")

            run()
    assert failures == [], "\n".join(failures[:20])
