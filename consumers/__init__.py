"""The long-running workers (buffer consumer, scanner, flusher, scheduler)."""
