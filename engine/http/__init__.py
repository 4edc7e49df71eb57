"""The one HTTP serving stack of medrelay (FHIR, DICOMweb, HTTP sources, the console).

- ``protocol``: uvicorn's h11 protocol with timeouts, a connection cap and head limits,
  answering protocol-level errors with a pluggable body (OperationOutcome, JSON, text);
- ``server``: uvicorn inside the engine's event loop, plain TCP or behind the audited
  TLS upgrade of ``engine.security.tls``;
- ``bearer``: bearer-token configuration and constant-time checking.

It lives in the engine so that the console (core layer) and the listeners (components)
serve through the same code; listeners/http_common.py is the component-side glue.
"""
