"""The REST API and the pages over a real store and a real uvicorn on loopback,
asked through httpx: reads, decisions, token-guarded changes with their audit,
escaping, CSRF, problem documents."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from kmodgate.abi.model import Export, ExportType, KernelABI
from kmodgate.errors import UserError
from kmodgate.web.app import create_app
from kmodgate.web.settings import WebSettings, parse_web_settings
from web_fixtures import (
    BUILD_REASON,
    EVIL,
    NEW,
    OLD,
    TOKEN,
    Scenario,
    fixed_clock,
    live_server,
    make_app,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"


@pytest.fixture
def client(scenario: Scenario) -> Iterator[httpx.Client]:
    with live_server(make_app(scenario)) as base, httpx.Client(base_url=base) as c:
        yield c


def waiver_body(**extra: object) -> dict[str, object]:
    return {"module": "openrazer-driver", "kernel_pattern": NEW, "kind": "build",
            "reason": "upstream fix pending", "duration": "7d", **extra}


def test_health_and_openapi(client: httpx.Client) -> None:
    health = client.get("/api/v1/health").json()
    assert health["status"] == "ok" and health["store"] == "sqlite"
    spec = client.get("/api/v1/openapi.json").json()
    paths = spec["paths"]
    for path in ("/api/v1/kernels", "/api/v1/results", "/api/v1/decision", "/api/v1/waivers",
                 "/api/v1/events", "/api/v1/health", "/api/v1/modules/{name}"):
        assert path in paths
    assert not any(p.startswith("/matrix") for p in paths)  # pages stay out of the API
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_the_server_warms_its_decisions_at_start(scenario: Scenario) -> None:
    app = make_app(scenario)
    cache = scenario.gate.decision_cache
    with live_server(app) as base:
        app.state.kmodgate.warming.join(timeout=20)
        assert cache.misses == 2  # the scenario's two kernels, before any question
        r = httpx.post(f"{base}/api/v1/decision", json={"kernel": NEW, "stream": "next"})
        assert r.status_code == 200 and (cache.hits, cache.misses) == (1, 2)
    assert not app.state.kmodgate.warming.is_alive()


def test_decision_is_greenwave_style(client: httpx.Client) -> None:
    r = client.post("/api/v1/decision", json={"kernel": NEW, "stream": "next"})
    assert r.status_code == 200
    d = r.json()
    assert d["allowed"] is False
    [blocking] = d["unsatisfied"]
    assert (blocking["module"], blocking["kind"], blocking["outcome"]) == (
        "openrazer-driver", "build", "fail")
    assert BUILD_REASON in json.dumps(blocking["reasons"])
    ok = client.post("/api/v1/decision", json={"kernel": OLD, "stream": "next"}).json()
    assert ok["allowed"] is True and ok["unsatisfied"] == []


@pytest.mark.parametrize(("body", "status"), [
    ({"kernel": "9.9.9-1-amd64", "stream": "next"}, 404),
    ({"kernel": NEW, "stream": "nowhere"}, 404),
    ({"kernel": NEW}, 422),
    ({"kernel": "a\x00b", "stream": "next"}, 422),
])
def test_decision_errors_are_problems(client: httpx.Client, body: dict[str, str],
                                      status: int) -> None:
    r = client.post("/api/v1/decision", json=body)
    assert r.status_code == status
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["status"] == status and problem["detail"]
    assert "Traceback" not in r.text


def test_results_filter_and_paginate(client: httpx.Client) -> None:
    everything = client.get("/api/v1/results", params={"limit": 500}).json()
    assert everything["total"] == 13  # 6 on OLD, 6 + one untracked module on NEW
    failing = client.get("/api/v1/results", params={"outcome": "fail", "kind": "build"}).json()
    assert [(r["module"], r["kernel"]) for r in failing["items"]] == [
        ("openrazer-driver", NEW)]
    assert failing["items"][0]["log"].endswith("/log")
    assert "log_path" not in failing["items"][0]  # server paths stay on the server
    pages = [client.get("/api/v1/results", params={"line": "6.1/amd64", "offset": o,
                                                   "limit": 5}).json()
             for o in (0, 5, 10)]
    ids = [r["id"] for p in pages for r in p["items"]]
    assert len(ids) == len(set(ids)) == 13 and ids == sorted(ids, reverse=True)
    assert client.get("/api/v1/results", params={"limit": 0}).status_code == 422
    assert client.get("/api/v1/results", params={"kind": "nope"}).status_code == 422
    assert client.get("/api/v1/results/999999").status_code == 404
    assert client.get(f"/api/v1/results/{2**70}").status_code == 422


def test_kernels_modules_and_log(client: httpx.Client, scenario: Scenario) -> None:
    kernels = client.get("/api/v1/kernels").json()
    assert [k["release"] for k in kernels["items"]] == [NEW, OLD]  # newest first
    k = client.get(f"/api/v1/kernels/{NEW}").json()
    assert k["previous"] == OLD
    assert {d["stream"]: d["allowed"] for d in k["decisions"]}["next"] is False
    assert {(r["module"], r["kind"]) for r in k["failing"]} == {
        ("openrazer-driver", "build"), (EVIL, "abi")}
    history = client.get("/api/v1/modules/openrazer-driver").json()
    [regression] = history["open"]
    assert (regression["last_good"], regression["first_bad"]) == (OLD, NEW)
    assert client.get("/api/v1/modules/nope").status_code == 404
    failing = client.get("/api/v1/results", params={"outcome": "fail", "kind": "build"})
    log = client.get(failing.json()["items"][0]["log"])
    assert log.status_code == 200 and BUILD_REASON in log.text
    assert log.headers["content-type"].startswith("text/plain")


def test_changes_need_a_token_and_are_audited(client: httpx.Client,
                                              scenario: Scenario) -> None:
    r = client.post("/api/v1/waivers", json=waiver_body())
    assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
    assert r.headers["www-authenticate"] == "Bearer"
    bad = client.post("/api/v1/waivers", json=waiver_body(),
                      headers={"Authorization": "Bearer guessed"})
    assert bad.status_code == 401
    added = client.post("/api/v1/waivers", json=waiver_body(), headers=AUTH)
    assert added.status_code == 201, added.text
    waiver = added.json()
    assert waiver["author"] == "release-team"
    d = client.post("/api/v1/decision", json={"kernel": NEW, "stream": "next"}).json()
    assert d["allowed"] is True and d["waivers"] == [waiver["id"]]

    promoted = client.post("/api/v1/promotions", json={"kernel": NEW, "stream": "next"},
                           headers=AUTH)
    assert promoted.status_code == 201 and promoted.json()["author"] == "release-team"
    pinned = client.post("/api/v1/pins", json={"stream": "next", "kernel": NEW,
                                               "reason": "hold for the release"},
                         headers=AUTH)
    assert pinned.status_code == 201
    assert client.post("/api/v1/pins", json={"stream": "next", "kernel": OLD,
                                              "reason": "x"}, headers=AUTH).status_code == 409
    assert client.delete("/api/v1/pins/next", headers=AUTH).status_code == 200
    assert client.delete("/api/v1/pins/next", headers=AUTH).status_code == 404
    revoked = client.post(f"/api/v1/waivers/{waiver['id']}/revoke", headers=AUTH)
    assert revoked.json()["revoked_at"] is not None
    assert client.get("/api/v1/waivers").json()["total"] == 0
    assert client.get("/api/v1/waivers?include_inactive=true").json()["total"] == 1

    audit = [json.loads(line) for line in scenario.audit_path.read_text().splitlines()]
    assert [a["action"] for a in audit] == ["waiver.add", "promote", "pin", "unpin",
                                            "waiver.revoke"]
    assert {a["actor"] for a in audit} == {"release-team"}
    assert TOKEN not in scenario.audit_path.read_text()


@pytest.mark.parametrize(("extra", "status"), [
    ({"duration": "soon"}, 422),
    ({"duration": "99999999w"}, 422),
    ({"duration": None, "expires_at": "2000-01-01T00:00:00"}, 422),
    ({"kind": "compile"}, 422),
    ({"module": "not-tracked"}, 404),
    ({"reason": ""}, 422),
])
def test_bad_waivers_are_refused(client: httpx.Client, extra: dict[str, object],
                                 status: int) -> None:
    r = client.post("/api/v1/waivers", json=waiver_body(**extra), headers=AUTH)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM


def test_reads_can_require_a_token(scenario: Scenario) -> None:
    closed = WebSettings(tokens=scenario.settings.tokens, reads="token")
    with live_server(create_app(scenario.gate, closed, clock=fixed_clock)) as base, \
            httpx.Client(base_url=base) as c:
        assert c.get("/api/v1/kernels").status_code == 401
        assert c.get("/matrix").status_code == 401
        assert c.get("/api/v1/kernels", headers=AUTH).status_code == 200
        assert c.get("/api/v1/health").status_code == 200  # monitors hold no token


def test_pages_render_and_escape(client: httpx.Client) -> None:
    for url in ("/", "/matrix", "/kernels", "/modules", f"/kernels/{NEW}",
                "/modules/openrazer-driver", "/waivers", "/matrix?kind=build&tag=input"):
        r = client.get(url)
        assert r.status_code == 200, url
        assert "<script" not in r.text, url
        assert "script-src" not in r.headers["content-security-policy"]  # none allowed
    results = client.get("/api/v1/results", params={"limit": 500}).json()
    evil = [r for r in results["items"] if r["module"] == EVIL]
    page = client.get(f"/results/{evil[0]['id']}").text
    assert "<script" not in page and "&lt;script&gt;" in page
    build = [r for r in results["items"] if r["kind"] == "build" and r["outcome"] == "fail"]
    log = client.get(f"/results/{build[0]['id']}/log", params={"q": "error"})
    assert log.status_code == 200 and "<script" not in log.text
    assert "<mark>error</mark>" in log.text and "2 lines match" in log.text
    assert client.get(f"/results/{results['items'][0]['id'] + 100}").status_code == 404
    assert client.get("/kernels/9.9.9-1-amd64").status_code == 404
    assert client.get("/matrix?kind=nope").status_code == 422


def test_matrix_cells_link_to_their_reasons(client: httpx.Client) -> None:
    page = client.get("/matrix").text
    red = re.findall(r'<a class="cell fail" href="(/results/\d+)"', page)
    assert len(red) == 1
    assert BUILD_REASON.replace("'", "&#39;") in client.get(red[0]).text


def test_waiver_form_needs_csrf_and_token(client: httpx.Client) -> None:
    form = client.get("/waivers")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None and client.cookies.get("kmodgate_csrf") == csrf.group(1)
    fields = {"module": "openrazer-driver", "kernel_pattern": NEW, "kind": "build",
              "reason": "fix pending", "duration": "3d"}
    no_csrf = client.post("/waivers", data={**fields, "token": TOKEN})
    assert no_csrf.status_code == 403
    cross = client.post("/waivers", data={**fields, "token": TOKEN, "csrf": csrf.group(1)},
                        headers={"Origin": "http://evil.example", "Sec-Fetch-Site":
                                 "cross-site"})
    assert cross.status_code == 403
    no_token = client.post("/waivers", data={**fields, "csrf": csrf.group(1)})
    assert no_token.status_code == 401 and "bearer token" in no_token.text
    assert 'value="fix pending"' not in no_token.text  # the textarea keeps it instead
    assert "fix pending</textarea>" in no_token.text
    ok = client.post("/waivers", data={**fields, "token": TOKEN, "csrf": csrf.group(1)})
    assert ok.status_code == 303 and ok.headers["location"].startswith("/waivers?added=")
    overview = client.get("/").text
    assert re.search(rf'data-kernel="{re.escape(NEW)}">.*?allowed', overview, re.S)
    listed = client.get("/waivers").text
    waiver_id = re.search(r'action="/waivers/(\d+)/revoke"', listed)
    assert waiver_id is not None
    revoked = client.post(f"/waivers/{waiver_id.group(1)}/revoke",
                          data={"token": TOKEN, "csrf": csrf.group(1)})
    assert revoked.status_code == 303


def symvers_kernel(release: str, crc: int) -> KernelABI:
    export = Export(symbol="hid_report_raw_event", crc=crc, provider="vmlinux",
                    export_type=ExportType.GPL)
    return KernelABI(release=release, exports={"hid_report_raw_event": export},
                     origin=f"test:{release}")


def test_kernel_page_abi_diff_and_a_clear_note_when_unfetchable(scenario: Scenario) -> None:
    def loader(release: str) -> KernelABI:
        return symvers_kernel(release, 1 if release == OLD else 2)

    def unfetchable(release: str) -> KernelABI:
        raise UserError("no linux-headers package for it in the apt sources",
                        where=f"debian:{release}")

    with live_server(create_app(scenario.gate, scenario.settings, clock=fixed_clock,
                                kernel_loader=loader)) as base:
        page = httpx.get(f"{base}/kernels/{NEW}", params={"abi": "true"}).text
        assert "1 crc changed" in page and "hid_report_raw_event" in page
    with live_server(create_app(scenario.gate, scenario.settings, clock=fixed_clock,
                                kernel_loader=unfetchable)) as base:
        page = httpx.get(f"{base}/kernels/{NEW}", params={"abi": "true"}).text
        assert "cannot be fetched" in page and "no linux-headers package" in page


def test_web_settings_from_toml() -> None:
    digest = "a" * 64
    s = parse_web_settings(f'[web]\nreads = "token"\n\n[[web.tokens]]\nname = "ci"\n'
                           f'sha256 = "{digest}"\n')
    assert s.reads == "token" and s.tokens[0].name == "ci"
    with pytest.raises(UserError, match=r"kmodgate.toml:5: web.tokens\[0\].sha256"):
        parse_web_settings('[web]\nreads = "open"\n\n[[web.tokens]]\nsha256 = "secret"\n'
                           'name = "ci"\n')
    with pytest.raises(UserError, match=r":2: web.colour: unknown key"):
        parse_web_settings('[web]\ncolour = "blue"\n')
