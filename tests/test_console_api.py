"""The admin API over real HTTP (httpx) against a running engine fed by a real MLLP client.

Roles are enforced (401 without credentials, 403 for a viewer on PHI and replay), PHI reads
and content searches are audited, the blind filters find a message by its MRN without any
identifier in clear in the database, replay sends a second copy to the downstream receiver
and the attempts history shows both, session POSTs need the CSRF token, failed logins are
audited and rate limited, and every error is JSON ``{"error", "detail"}``.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import wait_until
from console_support import PASSWORD, login, start
from sqlalchemy import select, text

from engine.store import schema
from engine.store.message_terms import message_terms

wait = wait_until


def audit_rows(eng, action: str) -> list:
    a = schema.audit_events
    with eng.store.engine.connect() as c:
        return list(c.execute(select(a).where(a.c.action == action).order_by(a.c.id)).mappings())


@pytest.fixture
def console(engine_factory):
    s = start(engine_factory)
    yield s
    s.rx.stop()


def test_every_request_is_authenticated_and_errors_are_json(console):
    with console.client() as c:
        for path in ("/api/channels", "/api/messages", "/api/audit", "/api/messages/x/payload"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
        assert c.post("/api/replay", json={"all": True}).status_code == 401
        assert c.get("/api/channels", headers={"Authorization": "Bearer mrt_not-a-token"}).status_code == 401
        assert c.get("/api/channels", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401
        page = c.get("/", follow_redirects=False)  # the console's pages send a browser to the login form
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
    with console.client("viewer") as c:
        r = c.get("/api/nothing-here")
        assert r.status_code == 404 and set(r.json()) == {"error", "detail"}
        r = c.get("/api/messages", params={"state": "lost"})
        assert r.status_code == 400 and "state must be one of" in r.json()["detail"]
        assert c.get("/api/messages", params={"cursor": "!!"}).json()["error"] == "bad_request"
        assert c.get("/api/messages", params={"since": "yesterday"}).status_code == 400
        assert c.get("/api/messages", params={"limit": "0"}).status_code == 400
        assert c.get("/api/messages/nope").status_code == 404
        r = c.post("/api/replay", content=b"{not json")
        assert r.status_code in (400, 403)  # a viewer is refused before the body is read: either is an answer
    with console.client("operator") as c:
        r = c.post("/api/replay", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["detail"] == "the body is not JSON"
        r = c.post("/api/replay", content=b"x" * 70_000)
        assert r.status_code == 413
        assert c.post("/api/replay", json={}).status_code == 400  # no filter: not everything by accident
        assert "traceback" not in c.get("/api/messages/%00").text.lower()


def test_channels_find_by_mrn_payload_output_replay_and_roles(console):
    eng = console.eng
    msg = console.send_adt("CTRL-1", mrn="MRN-778899")
    console.send_adt("CTRL-2", mrn="OTHER-1")
    console.rx.wait_for(2)

    with console.client("viewer") as v:
        ch = wait(lambda: (lambda d: d if d["channels"][0]["routes"][0]["delivered"] >= 2 else None)(
            v.get("/api/channels").json()))
        adt_in = ch["channels"][0]
        assert adt_in["name"] == "adt-in" and adt_in["listening"] is True and adt_in["received"] == 2
        assert adt_in["acked"] == 2 and adt_in["rejected"] == 0 and adt_in["queue_depth"] == 0
        listing = v.get("/api/messages", params={"channel": "adt-in"}).json()
        assert [m["headers"]["MSH-10"] for m in listing["messages"]] == ["CTRL-2", "CTRL-1"]  # newest first
        # a viewer sees headers but no PHI, and cannot search by patient, content or replay
        assert v.get("/api/messages", params={"patient_id": "MRN-778899"}).status_code == 403
        assert v.get("/api/messages", params={"q": "DOE"}).status_code == 403
        mid = listing["messages"][1]["id"]
        detail = v.get(f"/api/messages/{mid}").json()
        assert detail["headers"]["MSH-10"] == "CTRL-1" and "payload" not in detail
        assert detail["deliveries"][0]["tries"][0]["outcome"] == "done"
        assert v.get(f"/api/messages/{mid}/payload").status_code == 403
        assert v.get(f"/api/messages/{mid}/deliveries/ris/output").status_code == 403
        assert v.post(f"/api/messages/{mid}/replay", json={}).status_code == 403
        assert v.post("/api/replay", json={"all": True}).status_code == 403
    denied = audit_rows(eng, "console.access_denied")
    assert len(denied) >= 5 and {d["actor"] for d in denied} == {"viewer"}

    with console.client("operator") as o:
        found = o.get("/api/messages", params={"patient_id": "mrn-778899"}).json()["messages"]  # case-folded
        assert [m["id"] for m in found] == [mid]
        assert [m["id"] for m in o.get("/api/messages", params={"control_id": "CTRL-1"}).json()["messages"]] == [mid]
        assert o.get("/api/messages", params={"patient_id": "MRN-77889"}).json()["messages"] == []  # whole values
        hit = o.get("/api/messages", params={"q": "mrn-778899"}).json()
        assert [m["id"] for m in hit["messages"]] == [mid] and hit["search"]["scanned"] == 2
        assert hit["search"]["complete"] is True
        payload = o.get(f"/api/messages/{mid}/payload").json()
        assert "MRN-778899" in payload["text"] and payload["kind"] == "hl7v2"
        out = o.get(f"/api/messages/{mid}/deliveries/ris/output").json()
        assert out["outcome"] == "routed" and "PID|1||MRN-778899" in out["outputs"][0]["text"]
        assert o.get(f"/api/messages/{mid}/deliveries/nope/output").status_code == 404
        r = o.post(f"/api/messages/{mid}/replay", json={})
        assert r.status_code == 200 and r.json()["requeued"] == 1
    second = console.rx.wait_for(3)
    assert second[2] == msg  # the same bytes again, to the same receiver

    with console.client("operator") as o:
        tries = wait(lambda: (lambda t: t if len(t) == 2 else None)(
            o.get(f"/api/messages/{mid}").json()["deliveries"][0]["tries"]))
        assert [t["outcome"] for t in tries] == ["done", "done"] and all(t["detail"] == "AA" for t in tries)
        events = o.get("/api/audit", params={"action": "message.*", "actor": "operator"}).json()["events"]
        assert {e["action"] for e in events} >= {"message.read", "message.search", "message.replay"}
        reads = [e for e in events if e["action"] == "message.read"]
        assert all(e["message_id"] == mid and e["peer"].startswith("127.0.0.1:") for e in reads)
        assert not any("MRN-778899" in str(e) or "mrn-778899" in str(e) for e in events)  # never the searched text

    # nothing identifying in clear: the terms are HMACs, the messages table has no MRN
    with eng.store.engine.connect() as c:
        dump = " ".join(str(r) for r in c.execute(select(message_terms)))
        rows = " ".join(str(r) for r in c.execute(text("SELECT * FROM messages")))
        audit = " ".join(str(r) for r in c.execute(text("SELECT * FROM audit_events")))
    assert "778899" not in dump and "778899" not in rows and "778899" not in audit


def test_bulk_replay_by_filter_and_cursor_paging(console):
    for i in range(5):
        console.send_adt(f"PAGE-{i}", mrn=f"P{i}")
    console.rx.wait_for(5)
    with console.client("operator") as o:
        seen, cursor = [], None
        while True:
            page = o.get("/api/messages", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [m["headers"]["MSH-10"] for m in page["messages"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == [f"PAGE-{i}" for i in range(4, -1, -1)]
        r = o.post("/api/replay", json={"patient_id": "P3", "states": ["done"]})
        assert r.status_code == 200 and r.json()["requeued"] == 1
        assert o.post("/api/replay", json={"q": "P3", "states": ["done"]}).status_code == 400
        assert o.post("/api/replay", json={"states": ["pending"], "all": True}).status_code == 400
    got = console.rx.wait_for(6)
    assert b"PAGE-3" in got[5]


def test_session_cookie_csrf_and_login_rate_limit(console):
    c, r = login(console.base, "operator")
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "medrelay_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace(
        "Strict", "strict")
    assert "Secure" not in cookie  # plain HTTP here; test_console_tls checks it is set under TLS
    me = c.get("/api/me").json()
    assert me["user"] == "operator" and me["via"] == "session" and me["csrf"]
    console.send_adt("CSRF-1")
    console.rx.wait_for(1)
    mid = c.get("/api/messages").json()["messages"][0]["id"]
    r = c.post(f"/api/messages/{mid}/replay", json={})  # the cookie alone is not enough
    assert r.status_code == 403 and r.json()["error"] == "csrf"
    assert c.post(f"/api/messages/{mid}/replay", json={}, headers={"X-CSRF-Token": "0" * 40}).status_code == 403
    ok = c.post(f"/api/messages/{mid}/replay", json={}, headers={"X-CSRF-Token": me["csrf"]})
    assert ok.status_code == 200 and ok.json()["requeued"] == 1
    # the page forms need it too
    assert c.post(f"/messages/{mid}/replay", data={"route": ""}).status_code == 403
    # logout ends the session in the store, not only in the browser
    token = c.cookies.get("medrelay_session")
    assert c.post("/logout", data={"csrf": me["csrf"]}).status_code == 303
    with httpx.Client(base_url=console.base, cookies={"medrelay_session": token}) as stale:
        assert stale.get("/api/me").status_code == 401
    # a login form posted without its own CSRF cookie (from another site) starts no session
    with httpx.Client(base_url=console.base) as other:
        r = other.post("/login", data={"username": "operator", "password": PASSWORD, "csrf": "x"})
        assert r.status_code == 303 and "medrelay_session" not in r.headers.get("set-cookie", "")

    # failed logins: audited with user and address, then refused for a while (429) even with the right password
    for _ in range(5):
        _, r = login(console.base, "admin", "wrong password!!")
        assert r.status_code == 303 and "failed=1" in r.headers["location"]
    _, r = login(console.base, "admin")
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    failures = [e for e in audit_rows(console.eng, "console.login") if e["outcome"] == "failure"]
    assert len(failures) == 6 and all(e["actor"] == "admin" and e["peer"].startswith("127.0.0.1") for e in failures)
    # another user from the same address is not locked out by admin's failures
    _, r = login(console.base, "viewer")
    assert r.status_code == 303 and r.headers["location"] == "/"
    # an unknown user name fails the same way as a wrong password
    _, r = login(console.base, "nobody-at-all", PASSWORD)
    assert r.status_code == 303 and "failed=1" in r.headers["location"]


def test_no_default_user(engine_factory):
    from console_support import YAML
    from mllp_peers import MLLPReceiver

    rx = MLLPReceiver().start()
    try:
        eng = engine_factory(YAML.format(rx=rx.port, store_url="sqlite:///data/m.db", extra=""))
        host, port = eng.runtime.console.address
        base = f"http://{host}:{port}"
        for user, pw in (("admin", "admin"), ("admin", ""), ("medrelay", "medrelay"), ("root", "")):
            _, r = login(base, user, pw)
            assert r.status_code == 303 and "failed=1" in r.headers["location"]
    finally:
        rx.stop()


def test_dead_letter_page_bulk_replay(engine_factory):
    """Dead letters made by a receiver that rejects, then replayed in bulk from the console's
    dead-letter page (a form POST with the session's CSRF token), once the receiver accepts."""
    import re

    from mllp_peers import make_ack

    s = start(engine_factory)
    accept = {"on": False}
    s.rx.responder = lambda m, n: make_ack(m, "AA" if accept["on"] else "AR")
    try:
        for i in range(3):
            s.send_adt(f"DLQ-{i}", mrn=f"D{i}")
        with s.client("viewer") as v:
            wait(lambda: v.get("/api/channels").json()["channels"][0]["dead"] == 3)
        c, _ = login(s.base, "operator")
        page = c.get("/dead-letters")
        assert page.status_code == 200 and page.text.count('name="id"') == 3
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
        ids = re.findall(r'name="id" value="([0-9a-f]+)"', page.text)
        accept["on"] = True
        r = c.post("/dead-letters/replay", data={"csrf": csrf, "scope": "selected", "id": ids[:2]})
        assert r.status_code == 303 and "replayed=2" in r.headers["location"]
        wait(lambda: sum(b"MSA" not in m and b"DLQ-" in m for m in s.rx.received) >= 5)  # 3 rejected + 2 again
        r = c.post("/dead-letters/replay", data={"csrf": csrf, "scope": "filter", "channel": "adt-in"})
        assert r.status_code == 303 and "replayed=1" in r.headers["location"]
        with s.client("viewer") as v:
            wait(lambda: v.get("/api/channels").json()["channels"][0]["dead"] == 0)
            wait(lambda: v.get(f"/api/messages/{ids[0]}").json()["deliveries"][0]["state"] == "done")
        # delivered at last: the page shows no stale "Last error" under a done route (the AR is in the attempts)
        detail = c.get(f"/messages/{ids[0]}").text
        assert "Last error:" not in detail and "AR" in detail
        # a viewer sees the dead letters but gets no replay form, and a forged POST is refused
        cv, _ = login(s.base, "viewer")
        assert 'name="id"' not in cv.get("/dead-letters").text
        vcsrf = re.search(r'name="csrf-token" content="([^"]+)"', cv.get("/").text).group(1)
        assert cv.post("/dead-letters/replay", data={"csrf": vcsrf, "scope": "filter"}).status_code == 403
    finally:
        s.rx.stop()


def test_odd_times_limits_and_cursors_are_400_not_500(console):
    """A peer's numbers are read within bounds: no OverflowError (500), no NaN that matches nothing.

    Before: ``since=<400 digits>d`` and a 30-digit audit cursor were 500s (OverflowError in
    the float conversion / the driver), ``since=nan`` and ``until=1e400`` a silent empty 200.
    """
    bad_times = ("9" * 400 + "d", "nan", "-inf", "1e400", "\u0661\u0662\u0663")
    with console.client("operator") as c:
        for value in bad_times:
            for name in ("since", "until"):
                r = c.get("/api/messages", params={name: value})
                assert r.status_code == 400 and r.json()["error"] == "bad_request", (name, value, r.text)
            assert c.get("/api/audit", params={"since": value}).status_code == 400, value
            assert c.post("/api/replay", json={"since": value}).status_code == 400, value
        assert c.get("/api/messages", params={"since": "2h"}).status_code == 200
        for cursor in ("9" * 30, "-5", "abc", "\u0661"):
            r = c.get("/api/audit", params={"cursor": cursor})
            assert r.status_code == 400 and r.json()["detail"] == "cursor: not one this API gave out", cursor
        import base64
        nan_cursor = base64.urlsafe_b64encode(b"nan|x").decode().rstrip("=")
        assert c.get("/api/messages", params={"cursor": nan_cursor}).status_code == 400
        for path in ("/api/messages", "/api/audit"):
            for limit in ("abc", "9" * 30, "1.5"):
                r = c.get(path, params={"limit": limit})
                assert r.status_code == 400 and "limit must be 1 to" in r.json()["detail"], (path, limit)


def test_login_limit_counts_one_user_name_in_any_case(console):
    """A directory matches "Operator", "OPERATOR " and "operator" as one account: they share one count.

    Before, each spelling had its own five tries per window, so a guesser multiplied the per-user
    limit by the spellings of a name (the per-address limit still applied).
    """
    for name in ("Operator", "OPERATOR", " operator", "operator ", "oPeRaToR"):
        _, r = login(console.base, name, "wrong password!!")
        assert r.status_code == 303 and "failed=1" in r.headers["location"], name
    _, r = login(console.base, "operator")
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
