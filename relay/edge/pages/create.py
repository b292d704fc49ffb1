"""The **Create** step (``POST /setup/create``), which makes the whole connection or nothing.

:func:`relay.domain.connections.add` checks both sides, registers the webhook subscriptions and
stores the connection, with the invitation marked used in the same transaction; a refusal by Loop
or Qonto goes back to the step it belongs to, with what to do there (the Loop Hub action for a
dossier). The ready page follows.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Final

from starlette.requests import Request
from starlette.responses import Response

from relay import errors, log
from relay.domain import connections, credentials, eligibility, inputs, invitations
from relay.edge.pages import sessions, setup, views
from relay.store import db
from relay.upstreams import qonto

logger = log.get(__name__)

# Create refreshes Qonto tokens that would expire within this margin (plus the client's own five
# minutes) first, and stores them with the invitation: a refresh inside Create, which fails later,
# would leave the invitation with a spent refresh token.
CREATE_MARGIN: Final = dt.timedelta(minutes=10)


def _refusal(
    exc: errors.RelayError, invitation: invitations.Invitation, ctx: views.Context, api_key: str
) -> tuple[str, str]:
    """Find the step a refusal at Create belongs to, and what to tell there.

    What to tell includes the Loop Hub action when one is needed.
    """
    dossier = invitation.cegid_dossier or ""
    app_name = ctx.settings.loop_application_name
    if isinstance(exc, errors.CegidKeyRefused):
        return (
            "key",
            "Loop refused this API key and secret (HTTP 401). The firm's administrator finds "
            "them in CegidLife, in the administrator's account (the key and secret created for "
            "the Loop API; the secret is shown only once: if it is lost, create a new key and "
            "secret there). Type them again, then go on to Create.",
        )
    if isinstance(exc, errors.CegidDossierUnknown):
        return (
            "dossier",
            f"Loop does not know the code dossier {dossier!r} for this firm. Check the client "
            "file's code dossier in Cegid Loop, and the firm's domain, then go on to Create.",
        )
    if isinstance(exc, errors.CegidAccessRefused):
        return (
            "hub",
            f"Loop refused access to dossier {dossier!r} with this key (HTTP 403: the dossier "
            f"is not associated with the key). In Loop Hub, open the partner declared with "
            f"Application {app_name!r} and API key {api_key!r}, and associate dossier "
            f"{dossier!r} with it (or enable the partner connector in the Action column of "
            f"dossier {dossier!r}). Then press Create again.",
        )
    if isinstance(exc, errors.Retryable):
        return (
            "hub",
            "Qonto or Cegid Loop could not be reached, so nothing was created. Press Create "
            "again in a few minutes.",
        )
    return (
        "hub",
        f"The connection could not be created: {exc}. Nothing was created.",
    )


async def create(request: Request) -> Response:
    """Create the whole connection, or nothing, then show the ready page (**Create**)."""
    ctx = views.context(request)
    posted = await setup.posted_form(request, ctx)
    if isinstance(posted, Response):
        return posted
    session, invitation, _ = posted
    if invitation.next_step() != "hub":
        return views.see(setup.STEP_PATHS[invitation.next_step()])
    tokens = invitations.qonto_tokens(ctx.box, invitation)
    cegid = invitations.cegid_credentials(ctx.box, invitation)
    assert tokens is not None
    assert cegid is not None
    assert invitation.qonto_organization_id
    assert invitation.cegid_dossier
    assert invitation.cegid_domain

    async def keep(rotated: credentials.QontoCredentials) -> None:
        if isinstance(rotated, credentials.QontoOAuth):
            await invitations.store_qonto_tokens(ctx.pool, ctx.box, invitation.id, rotated)

    try:
        async with qonto.http_clients(ctx.settings) as http:
            fresh = qonto.client(
                ctx.settings,
                tokens,
                http,
                on_tokens_rotated=keep,
                now=lambda: dt.datetime.now(dt.UTC) + CREATE_MARGIN,
            )
            await fresh.get_membership()  # refreshes (and keeps) tokens close to their expiry
            tokens_now = fresh.current_credentials
        new = inputs.NewConnection(
            client_name=invitation.client_name,
            qonto_organization_id=invitation.qonto_organization_id,
            qonto=tokens_now,
            cegid=cegid,
            cegid_dossier=invitation.cegid_dossier,
            cegid_domain=invitation.cegid_domain,
            subscribe=True,
        )

        async def use(conn: db.Conn, connection_id: uuid.UUID) -> None:
            await invitations.use(conn, invitation.id, connection_id)

        created = await connections.add(ctx.settings, ctx.pool, new, within=use)
    except invitations.AlreadyUsed:
        return setup.invalid_link(ctx)
    except (errors.QontoAuthRejected, eligibility.RoleRefused, eligibility.PlanRefused) as exc:
        logger.warning("setup_create_qonto_refused", invitation=str(invitation.id))
        await invitations.forget_qonto(
            ctx.pool,
            invitation.id,
            f"Qonto no longer accepts the access given earlier ({_short(exc)}). Nothing was "
            "created. An owner, an admin or a reporting member of the organization presses "
            "Connect with Qonto again, then the accountant's values (kept) are used.",
        )
        return views.see(setup.STEP_PATHS["qonto"])
    except (errors.ConfigurationError, errors.DatabaseUnavailable):
        raise
    except errors.RelayError as exc:
        step, message = _refusal(exc, invitation, ctx, cegid.api_key.reveal())
        logger.info(
            "setup_create_refused",
            invitation=str(invitation.id),
            step=step,
            reason=type(exc).__name__,
        )
        await invitations.set_problem(ctx.pool, invitation.id, step, message)
        return views.see(setup.STEP_PATHS[step])
    logger.info(
        "setup_completed",
        invitation=str(invitation.id),
        connection=str(created.connection.id),
        subscriptions=created.subscriptions,
    )
    session.data = {
        "ready": {
            "connection_id": str(created.connection.id),
            "client_name": invitation.client_name,
            "dossier": invitation.cegid_dossier,
            "plan_unverified": invitation.qonto_plan is None,
        }
    }
    await sessions.save(ctx.pool, session)
    return views.see("/setup/ready")


def _short(exc: BaseException) -> str:
    return str(exc).split(":")[0][:200]


async def ready(request: Request) -> Response:
    """Show **Your integration is ready**, with the guide's note on the folder in Loop."""
    ctx = views.context(request)
    session = await sessions.current(ctx.pool, request)
    if session is None or "ready" not in session.data:
        return setup.session_expired(ctx)
    done = dict(session.data["ready"])
    return views.page(
        "ready.html",
        session,
        ctx,
        client_name=str(done.get("client_name", "")),
        dossier=str(done.get("dossier", "")),
        plan_unverified=bool(done.get("plan_unverified")),
    )
