"""The HTTP edge: what `relay serve` answers on its port besides the webhooks (the web pages)."""
