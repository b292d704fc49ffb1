"""The data layer, one module per table and one async function per statement of ``sql/queries.sql``.

Callers import the package (``from relay import store``, then ``store.documents.claim(...)``).
The style every table module follows is written above the imports below; ``relay.store.documents``
is a full example.
"""

# Every table module follows one style:
# - a function per named statement, taking what runs it first (``db.Executor``: the pool, or the
#   caller's transaction from ``db.transaction(pool, what)``), then typed parameters; its body runs
#   its statement (``queries.get`` by name) inside ``db.translate("what it does")``, no other SQL;
# - it returns frozen dataclasses (``@dataclasses.dataclass(frozen=True, slots=True)``: those of
#   ``relay.models`` when they fit, else its own), scalars or None, never an asyncpg Record;
# - ``queries.get`` and ``db.translate`` appear nowhere else (a unit test scans for them), and every
#   named statement belongs to exactly one function.
# A new table's module is imported here.
from relay.store import (
    audit,
    connections,
    documents,
    dossier_contents,
    events,
    flush_requests,
    heartbeats,
    invitations,
    oauth_states,
    overview,
    rate_limits,
    resources,
    runs,
    server,
    uploads,
    web_sessions,
    webhook_secrets,
)

__all__ = [
    "audit",
    "connections",
    "documents",
    "dossier_contents",
    "events",
    "flush_requests",
    "heartbeats",
    "invitations",
    "oauth_states",
    "overview",
    "rate_limits",
    "resources",
    "runs",
    "server",
    "uploads",
    "web_sessions",
    "webhook_secrets",
]
