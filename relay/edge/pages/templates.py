"""The pages' Jinja2 environment, with templates shipped in the package, autoescaped, strict.

A page is rendered with :func:`render`, which also gives every template the session's CSRF token
(``csrf_token``) for its forms and the stylesheet's URL.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Final

import jinja2
from starlette.responses import HTMLResponse

HERE: Final = pathlib.Path(__file__).resolve().parent
TEMPLATES: Final = HERE / "templates"
STATIC: Final = HERE / "static"


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(
    name: str,
    *,
    status: int = 200,
    csrf_token: str = "",
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """Render the template ``name`` as an HTML response."""
    html = environment().get_template(name).render(csrf_token=csrf_token, **context)
    return HTMLResponse(html, status_code=status, headers=headers)
