"""The HTTP edge, all that ``relay serve`` answers on its port (webhooks, admin API, web pages)."""
