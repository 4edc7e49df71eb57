"""The operator console and admin API (issue 11): one HTTP listener, UI at /, JSON under /api.

- ``config``: the top-level ``console:`` key (host, port, tls, sessions, login limits, search
  bounds, LDAP);
- ``server``: serves the Starlette app with uvicorn inside the engine's event loop (plain or
  TLS through engine/security), samples the counters for sparklines and fills in the blind
  index of older messages in the background;
- ``auth``: who is asking: ``Authorization: Bearer mrt_...`` (engine/auth) or the console's
  session cookie, CSRF tokens, the login rate limit;
- ``api``: the JSON endpoints (over engine/messages.py, the query code the CLI uses too);
- ``pages``: the server-rendered console (templates/, static/; no CDN);
- ``ldap``: LDAP / Active Directory bind as a second source of users.

The runtime starts it (engine/runtime.py) and hands it the running engine; nothing here
imports the runtime.
"""
