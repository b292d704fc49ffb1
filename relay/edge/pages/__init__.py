"""The relay's web pages, server-rendered HTML (Jinja2) with a stylesheet of its own and no script.

What every page shares is here for the setup flow (:mod:`.setup`, :mod:`.consent`, :mod:`.create`)
and the operators' console: :mod:`.templates`, :mod:`.views` (rendering and error pages),
:mod:`.sessions` (in PostgreSQL, with a CSRF token each), :mod:`.security` (headers),
:mod:`.ratelimit` and :mod:`.forms`. :func:`.site.routes` mounts them on the application.
"""
