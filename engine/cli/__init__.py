"""The ``medrelay`` command line: the outermost layer of the engine, which may use every room below.

``main`` defines the commands (click); ``casetest`` runs ``medrelay test`` cases, ``docs``
renders the component reference from the registry, ``bulk_import`` is ``medrelay import`` (a
client of a running engine). Commands parse arguments and print; what they compute lives in
the rooms below (``engine.messages`` for listings, ``engine.store`` for gc and key rotation), so
that an API or console can call the same code.
"""
