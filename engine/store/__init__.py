"""The store: one database (SQLite or PostgreSQL) and one folder of encrypted blobs.

What belongs here is what every message needs from persistence: the schema of messages,
deliveries, blobs and audit rows (``schema``), the Store with its sealed blob read/write and
migrations (``db``), prepared statements (``prepared``), the registry of `store` destination
handlers (``handlers``), garbage collection of unreferenced blob files (``gc``) and the re-wrap
of data keys on key rotation (``key_rotation``). The archive (``dicom/``) and the FHIR store
(``fhir/``) are rooms of their own above the core; only their ``tables`` modules sit at this
layer, so that ``Store.migrate()`` creates the whole schema.
"""
