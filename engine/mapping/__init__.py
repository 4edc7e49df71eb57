"""Declarative mappings: one rule engine for HL7 v2, DICOM and FHIR.

- ``rules``: the rule models (what an integration engineer writes in YAML), documented
  with their Field descriptions so docs/mappings.md is generated from them.
- ``conditions``: the condition language of ``when:`` (routes, rules) and ``filter``.
- ``tables``: code tables (CSV, inline values, FHIR ConceptMap).
- ``hl7``, ``dicom``, ``fhir``: the path grammar of each kind and the document the rules
  change (parsed once, serialised once).
- ``interpreter``: compiles a rule list against one kind and runs it.

Sits in the foundation layer: it imports only ``engine.hl7`` (escaping, delimiters,
charsets) and libraries, because ``engine.match`` (core) evaluates route ``when:``
with it and the transforms in transforms/ build on it.
"""
