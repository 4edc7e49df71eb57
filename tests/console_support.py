"""An engine with the console on, a downstream MLLP receiver, and users of each role."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import httpx
from mllp_peers import MLLPReceiver, RawClient, adt, wrap

from engine.auth.users import add_user, issue_token

PASSWORD = "correct horse battery"

YAML = """
store: {{url: "{store_url}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
console: {{host: 127.0.0.1, port: 0{extra}}}
channels:
  adt-in:
    source: {{type: mllp, port: 0}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx}, timeout: 5}}
        retry: {{max_attempts: 3, initial_delay: 0.05, max_delay: 0.2}}
"""


@dataclass
class Setup:
    eng: object
    rx: MLLPReceiver
    base: str
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, role: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30, **kw)

    def send_adt(self, control_id: str, mrn: str = "12345", name: str = "DOE^JOHN") -> bytes:
        msg = adt(control_id, name=name).replace(b"12345^^^HOSP^MR", f"{mrn}^^^HOSP^MR".encode())
        host, port = self.eng.address("adt-in")
        with RawClient(host, port) as c:
            c.send_raw(wrap(msg))
            ack = c.recv_frame()
        assert b"MSA|AA" in ack, ack
        return msg


def start(engine_factory, store_url: str = "sqlite:///data/m.db", extra: str = "") -> Setup:
    rx = MLLPReceiver().start()
    eng = engine_factory(YAML.format(rx=rx.port, store_url=store_url, extra=extra))
    host, port = eng.runtime.console.address
    scheme = "https" if "tls" in extra else "http"
    s = Setup(eng, rx, f"{scheme}://{host}:{port}")
    for role in ("viewer", "operator", "admin"):
        add_user(eng.store, role, role, PASSWORD)
        s.tokens[role] = issue_token(eng.store, role)[1]
    return s


def login(base: str, user: str, password: str = PASSWORD, **kw) -> tuple[httpx.Client, httpx.Response]:
    """A browser-like login through the form: GET /login (login CSRF cookie), POST the form."""
    c = httpx.Client(base_url=base, timeout=30, follow_redirects=False, **kw)
    form = c.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    r = c.post("/login", data={"username": user, "password": password, "csrf": token, "next": "/"})
    return c, r
