"""The shared config blocks (docs/notes/config-bases.md): the HTTP limits and the ingest keys are
declared once, every source keeps the defaults it had, and the docs list a source's own keys first."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.cli.docs import components_markdown, config_fields
from engine.console.config import ConsoleConfig
from engine.http.limits import HttpBodyLimitsConfig, HttpLimitsConfig
from listeners.dicomweb import DicomWebSourceConfig
from listeners.fhir import FhirSourceConfig
from listeners.file import FileSourceConfig
from listeners.http import HttpSourceConfig
from listeners.ingest import IngestConfig

MiB = 1024 * 1024
OPEN = {"auth": {"open": True}}
HTTP_DEFAULTS = {"max_header_bytes": 16384, "max_header_count": 100, "max_url_bytes": 8192, "max_connections": 200,
                 "idle_timeout": 5.0, "header_timeout": 10.0, "body_timeout": 60.0, "handshake_timeout": 10.0}

# every default as it was before the blocks were folded: a user's YAML means what it meant
CONFIGS = {
    "http": (HttpSourceConfig(type="http", **OPEN),
             {**HTTP_DEFAULTS, "max_body_bytes": 16 * MiB, "body_budget_bytes": 64 * MiB,
              "accept": ["dicom", "hl7v2", "fhir"], "fhir": "create", "ae_title": "MEDRELAY",
              "calling_ae_title": "HTTP", "accept_versions": [], "accept_processing_ids": []}),
    "fhir": (FhirSourceConfig(type="fhir", **OPEN),
             {**HTTP_DEFAULTS, "max_body_bytes": 16 * MiB, "body_budget_bytes": 64 * MiB}),
    "dicomweb": (DicomWebSourceConfig(type="dicomweb", **OPEN),
                 {**HTTP_DEFAULTS, "body_timeout": 300.0, "max_body_bytes": 256 * MiB,
                  "body_budget_bytes": 512 * MiB}),
    "console": (ConsoleConfig(), {**HTTP_DEFAULTS, "max_connections": 100, "idle_timeout": 15.0}),
    "file": (FileSourceConfig(type="file", path="in"),
             {"accept": ["dicom", "hl7v2", "fhir"], "fhir": "create", "ae_title": "MEDRELAY",
              "calling_ae_title": "FILE", "accept_versions": [], "accept_processing_ids": []}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_defaults_are_the_ones_users_had(name):
    config, expected = CONFIGS[name]
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("name", ["http", "fhir", "dicomweb", "console"])
def test_http_limits_come_from_the_config(name):
    config, _ = CONFIGS[name]
    changed = type(config).model_validate({**config.model_dump(), "max_url_bytes": 300, "body_timeout": 7.5,
                                           "max_connections": 3})
    limits = changed.http_limits("ch")
    assert (limits.max_url_bytes, limits.body_timeout, limits.max_connections, limits.channel) == (300, 7.5, 3, "ch")
    with pytest.raises(ValidationError):  # the block's own checks hold in every server
        type(config).model_validate({**config.model_dump(), "max_header_bytes": 100})


@pytest.mark.parametrize("model", [HttpSourceConfig, FhirSourceConfig, DicomWebSourceConfig])
def test_body_budget_is_checked_in_every_source(model):
    with pytest.raises(ValidationError, match="body_budget_bytes must be at least max_body_bytes"):
        model(type=model.model_fields["type"].annotation.__args__[0], max_body_bytes=2 * MiB,
              body_budget_bytes=MiB, **OPEN)


def test_blocks_are_declared_once():
    """A config names a shared key only to change its default or what a refusal does."""
    overrides = {HttpSourceConfig: {"accept", "calling_ae_title"}, FileSourceConfig: {"accept", "calling_ae_title"},
                 FhirSourceConfig: {"max_body_bytes"}, ConsoleConfig: {"max_connections", "idle_timeout"},
                 DicomWebSourceConfig: {"max_body_bytes", "body_budget_bytes", "body_timeout"}}
    for model, allowed in overrides.items():
        shared = {n for base in (HttpLimitsConfig, IngestConfig) if issubclass(model, base)
                  for n in (HttpBodyLimitsConfig if base is HttpLimitsConfig else base).model_fields}
        assert set(vars(model).get("__annotations__", {})) & shared == allowed, model.__name__
    assert issubclass(ConsoleConfig, HttpLimitsConfig) and not issubclass(ConsoleConfig, HttpBodyLimitsConfig)
    with pytest.raises(ValidationError):  # still strict: an unknown key is an error
        ConsoleConfig(max_body_bytes=1)
    # an overridden key keeps the block's checks
    with pytest.raises(ValidationError):
        DicomWebSourceConfig(type="dicomweb", body_timeout=0, **OPEN)
    with pytest.raises(ValidationError):
        FileSourceConfig(type="file", path="in", calling_ae_title="X" * 17)


def test_docs_list_own_keys_first():
    names = [n for n, _ in config_fields(HttpSourceConfig)]
    assert names[:6] == ["type", "host", "port", "path", "auth", "tls"]
    assert names.index("accept_processing_ids") < names.index("max_body_bytes") < names.index("max_header_bytes")
    assert names[-1] == "handshake_timeout"
    dicomweb = [n for n, _ in config_fields(DicomWebSourceConfig)]
    assert dicomweb[:3] == ["type", "host", "port"] and dicomweb.index("body_timeout") > dicomweb.index("max_results")
    file_keys = [n for n, _ in config_fields(FileSourceConfig)]
    assert file_keys[:2] == ["type", "path"] and file_keys[-6:] == list(IngestConfig.model_fields)
    doc = components_markdown()
    http = doc[doc.index("### `type: http`"):]
    assert http.index("| `host` |") < http.index("| `accept` |") < http.index("| `max_header_bytes` |")
