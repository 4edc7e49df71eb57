"""Transforms: pure conversions between message kinds run by route workers in a thread
(DICOM to HL7 v2 and FHIR, HL7 v2 to FHIR, orders to worklist items, PS3.15 de-identification).

A transform takes an Envelope and returns one or more, or raises Drop to filter; it sends
nothing and stores nothing itself. Shared HL7 v2 and DICOM helpers for them live here too
(``hl7_text``, ``v2_datatypes``, ``dicom_common``).
"""
