"""Advice about the client's folder in Loop, which the relay cannot see.

Loop shows the partner's folder for a client after the first deposit, sometimes hours later, and
nothing in its API lists folders. :func:`folder_warning` is the advice ``relay connections show``
(and the run report) gives, counted from the connection's (re)connection and its first accepted
deposit.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from relay import models

FOLDER_DEADLINE: Final = dt.timedelta(hours=24)
FOLDER_CHECK_UNTIL: Final = dt.timedelta(days=7)  # the check after the first deposit, not forever
FOLDER_ADVICE: Final = (
    "the client's folder has not appeared in Loop 24 hours after setup: disconnect and reconnect "
    "(relay connections disconnect {id} then relay connections reconnect {id}), and check in Loop Hub "
    "that dossier {dossier} is associated with the partner's API key"
)
FOLDER_CHECK: Final = (
    "the first document reached Loop more than 24 hours ago: if the client's folder is not visible "
    "in Loop yet, disconnect and reconnect (relay connections disconnect {id} then relay connections "
    "reconnect {id}), and check in Loop Hub that dossier {dossier} is associated with the partner's "
    "API key"
)


def folder_warning(
    connection: models.Connection,
    now: dt.datetime,
    *,
    waiting_documents: int,
    connected_at: dt.datetime,
    first_deposit_at: dt.datetime | None,
) -> str | None:
    """Advise about the client's folder in Loop, counting from the (re)connection.

    Loop shows the partner's folder after the first deposit, sometimes hours later; nothing in its
    API lists folders, so the relay cannot see it. 24 hours after (re)connection it advises
    disconnect and reconnect when Cegid refuses the dossier, or when documents are waiting (pending,
    being sent or in doubt; not failed, and not for a refusal on Qonto's side) and no deposit was
    accepted since. Once a deposit was accepted, it asks the accountant to check the folder is
    visible, from 24 hours to 7 days after that first deposit (a check, not a standing warning).
    """
    if connection.state in (models.ConnectionState.REVOKED, models.ConnectionState.DISCONNECTED):
        return None
    if now - connected_at < FOLDER_DEADLINE:
        return None
    flagged = connection.state == models.ConnectionState.NEEDS_ATTENTION
    advice = {"id": connection.id, "dossier": connection.cegid_dossier}
    if flagged and models.Refuser.CEGID in connection.refused_by:
        return FOLDER_ADVICE.format(**advice)
    if first_deposit_at is not None:
        since_deposit = now - first_deposit_at
        if FOLDER_DEADLINE <= since_deposit < FOLDER_CHECK_UNTIL:
            return FOLDER_CHECK.format(**advice)
        return None
    if flagged and models.Refuser.QONTO in connection.refused_by:
        return None  # the documents wait for Qonto's credentials, not for Loop
    if waiting_documents > 0:
        return FOLDER_ADVICE.format(**advice)
    return None
