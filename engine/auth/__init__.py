"""Users, roles and API tokens for the HTTP APIs an operator uses (admin API and console).

``tables`` holds the users and tokens tables (at the store layer, so the schema is whole);
``users`` creates users with memory-hard password hashes (argon2id), issues and revokes API
tokens (only their SHA-256 is stored) and checks a role. Roles are ordered: ``viewer``
(counters, headers, no PHI) < ``operator`` (PHI, replay, dead letters) < ``admin`` (users,
keys, config). There is no default user or password: the first admin is made from the CLI.
"""
