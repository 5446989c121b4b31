"""The one place where exceptions become HTTP error responses.

Body: ``{"error": {"code", "message", "origin"}}``; the ``X-Bastion-Error-Origin``
header says whose fault it is (``client``, ``gateway`` or ``upstream``), and
a 401 carries ``WWW-Authenticate`` so clients know to (re)authenticate.
Unexpected exceptions are logged with their traceback and answered with a
generic 500 that reveals nothing internal.
"""

from __future__ import annotations

import logging

import orjson
from starlette.responses import Response

from bastion.errors import BastionError

log = logging.getLogger("bastion.proxy")

ORIGIN_HEADER = "X-Bastion-Error-Origin"


def error_response(exc: BaseException) -> Response:
    if isinstance(exc, BastionError):
        status, code, origin, message = exc.http_status, exc.code, exc.origin, exc.message
    else:
        log.error("unexpected error while serving a request", exc_info=exc)
        status, code, origin = 500, "internal", "gateway"
        message = "internal error in the gateway (see its logs)"
    headers: dict[str, str] = {ORIGIN_HEADER: origin}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="bastion", error="invalid_token"'
    body = orjson.dumps({"error": {"code": code, "message": message, "origin": origin}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)
