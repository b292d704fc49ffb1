"""The operators' console under ``/console``, showing what needs someone today and acting on it.

Built on the setup pages' web layer (:mod:`relay.edge.pages`: templates, sessions, CSRF, headers,
rate limits). :mod:`.auth` signs operators in with the admin token and guards every page and
action; :mod:`.pages` renders the pages; :mod:`.actions` holds the POSTs (each audited);
:mod:`.words` says states and reasons in plain words; :mod:`.routes` mounts them.
"""
