"""Destinations: the components that deliver a route's output (MLLP, HL7 application ACKs,
C-STORE, FHIR REST, folders, medrelay's own store).

A destination's ``send`` raises DeliveryError on failure (permanent or to be retried); the
route worker in engine/pipeline.py owns leases, retries and the dead-letter queue.
"""
