"""The one interface the MCP handler uses to reach a session's upstream.

Two kinds implement it: ``http_upstream.HTTPUpstream`` (a streamable-HTTP server behind a
shared keep-alive pool: each POST is a reverse-proxied HTTP exchange) and
``stream_upstream.StreamUpstream`` (a message stream: a stdio process, a legacy SSE server,
the demo; one reader task feeds the engine and routes what comes back).  The handler never
asks which kind it holds.

Nothing reaches an upstream except through :meth:`Upstream.exchange`, which takes the
engine's :class:`~bastion.session.engine.ForwardToUpstream`: the message the policy judged,
as the engine serialised it (decision 0022).  An upstream is also the session's outlet for
messages to the client that no request is waiting for (:meth:`to_client`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from starlette.types import Receive

from bastion.answers import Answer
from bastion.session.engine import ForwardToUpstream, SendToClient

if TYPE_CHECKING:
    from bastion.appservice.sessions import GatewaySession


@dataclass(frozen=True, slots=True)
class ClientPost:
    """The client's POST that a forward answers."""

    #: Its headers, lower-cased (what may pass upstream is picked per session).
    headers: dict[bytes, bytes]
    #: An allowed sub-path of the app, normalised and encoded ("" for its MCP endpoint).
    target: str = ""
    #: Whether this POST began the session (its answer carries the new ``Mcp-Session-Id``).
    new: bool = False


class Upstream(Protocol):
    #: True while the upstream works on a request of the session (the idle reaper waits).
    @property
    def busy(self) -> bool: ...

    async def start(self, s: GatewaySession) -> None:
        """The session is made: begin reading (message streams); nothing for HTTP."""

    async def exchange(
        self, s: GatewaySession, fwd: ForwardToUpstream, answer: Answer, post: ClientPost
    ) -> None:
        """Send the forwarded message and answer the client's POST with what comes back."""

    async def listen(
        self, s: GatewaySession, answer: Answer, receive: Receive, headers: dict[bytes, bytes]
    ) -> None:
        """Answer a GET: the server-to-client stream (resumable with ``Last-Event-ID``)."""

    async def client_ended(self, s: GatewaySession, headers: dict[bytes, bytes]) -> None:
        """The client sent DELETE: end the upstream's own session if it has one."""

    #: True when :meth:`to_client_after` holds messages itself (a reader that must not wait).
    defers: bool

    def to_client(self, cmd: SendToClient) -> None:
        """Deliver a message to the client outside any POST's answer (a notification, a late error)."""

    def to_client_after(self, barrier: asyncio.Future[None], cmd: SendToClient) -> None:
        """Deliver ``cmd`` once ``barrier`` (its call's outcome commit) resolved, in order with
        every later message (decision 0040); only called when :attr:`defers`."""

    def forward(self, cmd: ForwardToUpstream) -> None:
        """A forward outside a client POST: never made by the engine; refused (logged)."""

    async def stop(self, s: GatewaySession) -> None:
        """The session is ending: stop reading, wake every waiting POST and GET (before its end event)."""

    async def release(self, s: GatewaySession, reason: str) -> None:
        """The session has ended (after its end event): close the stream, or end the upstream's session."""
