"""The medrelay engine: what every message goes through, whatever protocol brought it.

The top level is the core (envelope, registry and component contract, configuration,
intake with group commit, routing, the delivery queue and route workers, the runtime,
metrics, the message queries). Concerns that are not the core have rooms: ``hl7/`` (HL7 v2
bytes), ``security/`` (sealing, keys, TLS, blind indexes), ``audit/`` (the trail and its
export), ``store/`` (database and blobs, with ``dicom/`` and ``fhir/`` for the archive and
the FHIR store) and ``cli/`` (the command line). Layers and arrows: docs/architecture.md,
"Layout", checked by tests/test_layering.py. The engine imports no component.
"""
