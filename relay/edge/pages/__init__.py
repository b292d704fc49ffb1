"""The relay's web pages: server-rendered HTML (Jinja2), a small stylesheet of its own, no script.

What every page shares is here for the setup flow (:mod:`.setup`, :mod:`.consent`, :mod:`.create`)
and the operators' console to use: the templates (:mod:`.templates`), rendering and error pages
(:mod:`.views`), server-side sessions in PostgreSQL with a CSRF token per session (:mod:`.sessions`),
security headers (:mod:`.security`), rate limits (:mod:`.ratelimit`), and form parsing
(:mod:`.forms`). :func:`.site.routes` mounts them on the application.
"""
