"""A FHIR listener on a real Store + Intake in a background event loop, for the FHIR tests.

Stands in for the runtime: same objects the runtime wires (KeyRing, Store, Audit,
Intake, ComponentContext), none of them mocked. Tests talk to it over HTTP.
MEDRELAY_TEST_FHIR_STORE_URL points it at another database (e.g. PostgreSQL) for a
manual run of one test module against a fresh database.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.audit.trail import Audit
from engine.context import ComponentContext
from engine.intake import Intake
from engine.security.crypto import KeyRing
from engine.store.db import Store
from listeners.fhir import FhirSourceConfig, build

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def server_fixtures(name: str) -> tuple[Any, Any]:
    """A test module's ``server`` (one listener for the module) and ``client`` (httpx with the
    token) fixtures: ``server, client = server_fixtures("fhir-x")`` at module level."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory: Any) -> Any:
        s = FhirServer(tmp_path_factory.mktemp(name)).start()
        yield s
        s.stop()

    @pytest.fixture
    def client(server: FhirServer) -> Any:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as c:
            yield c

    return server, client


class FhirServer:
    def __init__(self, root: Path, *, channel: str = "fhir-in", routes: tuple[str, ...] = (),
                 store_url: str | None = None, **config: Any) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.keyring = KeyRing(root / "keys.json")
        url = store_url or os.environ.get("MEDRELAY_TEST_FHIR_STORE_URL") or f"sqlite:///{root / 'medrelay.db'}"
        self.store = Store(url, root / "blobs", self.keyring)
        self.store.migrate()
        self.audit = Audit(self.store)
        self.intake = Intake(self.store, config_hash="t", router=lambda e: list(routes),
                             dedupe_window=lambda ch: 0)
        cfg = {"type": "fhir", "port": 0, "auth": {"bearer_tokens": [TOKEN]}, **config}
        self.config = FhirSourceConfig.model_validate(cfg)
        self.ctx = ComponentContext(settings=None, store=self.store, keyring=self.keyring,  # type: ignore[arg-type]
                                    audit=self.audit, channel=channel, intake=self.intake)
        self.listener = build(self.config, self.ctx)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> FhirServer:
        self._thread.start()

        async def up() -> None:
            await self.intake.start()
            await self.listener.start()

        self.call(up())
        return self

    @property
    def base_url(self) -> str:
        host, port = self.listener.address
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{host}:{port}{self.config.base_path}"

    def stop(self) -> None:
        async def down() -> None:
            await self.listener.stop()
            await self.intake.stop()

        self.call(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.store.dispose()


def adt_bundle(mrn: str = "12345", visit: str = "V1", obs: str = "OBX-1") -> dict:
    """The shape hl7_to_fhir produces: conditional update of Patient, conditional creates, urn:uuid refs."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:6f1e8f3a-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5",
                                                                 "value": mrn}],
                      "name": [{"family": "Everyman", "given": ["Adam"]}], "gender": "male"},
         "request": {"method": "PUT", "url": f"Patient?identifier=urn:oid:2.16.840.1.113883.19.5|{mrn}"}},
        {"fullUrl": "urn:uuid:6f1e8f3a-0000-4000-8000-000000000002",
         "resource": {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "IMP"},
                      "identifier": [{"system": "urn:visit", "value": visit}],
                      "subject": {"reference": "urn:uuid:6f1e8f3a-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Encounter", "ifNoneExist": f"identifier=urn:visit|{visit}"}},
        {"fullUrl": "urn:uuid:6f1e8f3a-0000-4000-8000-000000000003",
         "resource": {"resourceType": "Observation", "status": "final",
                      "identifier": [{"system": "urn:obx", "value": obs}],
                      "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                      "subject": {"reference": "urn:uuid:6f1e8f3a-0000-4000-8000-000000000001"},
                      "encounter": {"reference": "urn:uuid:6f1e8f3a-0000-4000-8000-000000000002"},
                      "valueQuantity": {"value": 72, "unit": "/min"}},
         "request": {"method": "POST", "url": "Observation", "ifNoneExist": f"identifier=urn:obx|{obs}"}},
    ]}
