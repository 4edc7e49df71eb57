"""The FHIR R4 resource store: versions, encrypted bodies, search, bundles.

``tables`` defines its tables; ``params`` holds the search-parameter table, index extraction,
validation and OperationOutcome errors; ``resources`` reads and writes versions; ``search``
turns a query into SQL; ``bundle`` runs REST writes, transactions and batches; ``handler`` is
the ``fhir`` handler of the `store` destination. The HTTP API is listeners/fhir*.py.
"""
