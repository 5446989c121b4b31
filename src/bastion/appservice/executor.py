"""The executor: the one place where the session engine's commands are carried out.

The engine (``session/engine.py``) decides and returns commands; :meth:`Executor.run` does
them, in order, with a ``match`` over the whole ``Command`` union (``assert_never`` makes a
new command a type error until it is handled here):

- ``RecordAudit``: committed durably before anything later in the batch; if the audit log
  cannot take it, the batch stops and ``run`` returns False (nothing is forwarded);
- ``CompleteAudit``: the stored event gets its outcome, durably, before the messages after it
  in the batch reach the client (its answer included: an OK the client saw is an outcome on
  disk — decision 0040).  A POST's batch waits for the commit; an outlet that ``defers`` (a
  stream upstream's reader, which must not wait for one commit per message) is handed the
  messages with the commit's future and delivers them, in order, once it resolves.  An outcome
  the audit log cannot take is logged and the answer still goes (the call ran; the store's
  sweep marks its row "outcome unknown", decision 0038);
- ``ForwardToUpstream`` and ``SendToClient``: handed to the batch's :class:`Outlet` (the
  client's POST collects its answer and its forward; a session's upstream delivers the rest);
- ``CloseSession``: the session ends (upstream and streams closed, end event with the reason);
- ``Log``: a line in the structured log, with the session id;
- ``RecordPins``: handed to the :class:`PinRecorder` (stored for the cluster in the background,
  off the data path: decision 0045), and the changes counted;
- ``CheckRate``: a token drawn from each bucket by the :class:`RateCounter` (the backend, or the
  tunnel: one round trip per bucket), the outcome fed back through ``Session.rate_checked`` and
  its commands carried out in turn (decision 0051).  A counter that fails refuses the call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, assert_never

from bastion.appservice.sessions import GatewaySession
from bastion.audit.events import AuditEvent
from bastion.audit.store import Completion
from bastion.errors import BastionError
from bastion.policy.limits import RateRule
from bastion.protocol import jsonrpc
from bastion.session.engine import (
    CheckRate,
    CloseSession,
    Command,
    CompleteAudit,
    ForwardToUpstream,
    Log,
    RecordAudit,
    RecordPins,
    SendToClient,
)

log = logging.getLogger("bastion.app")
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Ends a session: (session, reason).  The handler's, since it owns the session table.
Ender = Callable[[GatewaySession, str], Awaitable[None]]


class AuditSink(Protocol):
    """What the executor needs of the audit log (``audit.emitter.AuditLog``)."""

    async def record(self, event: AuditEvent) -> None: ...

    def completing(self, update: Completion) -> asyncio.Future[None]: ...


class PinRecorder(Protocol):
    """Where new pins and definition changes go (``appservice.pins.PinBook``)."""

    def record(self, cmd: RecordPins) -> None: ...


class RateCounter(Protocol):
    """Where rate limit buckets are kept (decision 0051): one atomic draw per call and bucket."""

    async def take(self, key: str, interval: float, tolerance: float) -> float:
        """Draw a token: 0.0 if one was there (taken), else seconds until there is one."""
        ...


class Outlet(Protocol):
    """Where a batch's messages go: to the client, and (from a client message only) upstream."""

    #: True: ``to_client_after`` holds a message until a commit without the caller waiting.
    defers: bool

    def to_client(self, cmd: SendToClient) -> None: ...

    def to_client_after(self, barrier: asyncio.Future[None], cmd: SendToClient) -> None: ...

    def forward(self, cmd: ForwardToUpstream) -> None: ...


class Collected:
    """The outlet of a batch whose messages the caller writes itself: a client's POST (the
    gateway's own answer, or the one forward to carry out) and an upstream's answer to it."""

    __slots__ = ("fwd", "replies")

    defers = False

    def __init__(self) -> None:
        self.replies: list[SendToClient] = []
        self.fwd: ForwardToUpstream | None = None

    def to_client(self, cmd: SendToClient) -> None:
        self.replies.append(cmd)

    def to_client_after(self, barrier: asyncio.Future[None], cmd: SendToClient) -> None:
        raise AssertionError("a POST's batch waits for its commits")  # defers is False

    def forward(self, cmd: ForwardToUpstream) -> None:
        if self.fwd is None:  # the engine forwards at most one message per client message
            self.fwd = cmd
        else:
            log.error("the engine forwarded twice for one client message; the second was dropped")


def _outcome_lost(session_id: str, event_id: str, e: BastionError) -> None:
    log.error(
        "audit unavailable; the outcome of a call was not recorded",
        extra={"session_id": session_id, "event_id": event_id, "error": e.message},
    )


def _outcome_written(session_id: str, event_id: str, fut: asyncio.Future[None]) -> None:
    if fut.cancelled():
        return
    e = fut.exception()
    if isinstance(e, BastionError):
        _outcome_lost(session_id, event_id, e)
    elif e is not None:
        log.error("the outcome of a call failed to be written", exc_info=e, extra={"event_id": event_id})


class Executor:
    """Carries out engine commands for the sessions of one MCP handler."""

    def __init__(
        self,
        audit: AuditSink,
        *,
        end: Ender,
        upstream_failed: Ender,
        pins: PinRecorder | None = None,
        rates: RateCounter | None = None,
    ) -> None:
        self.audit = audit
        #: Stores pins for the cluster; None where no app pins (a RecordPins is then logged).
        self.pins = pins
        #: Rate limit buckets; None: a rate-limited call is refused (nothing can count it).
        self.rates = rates
        #: End a session (its end event records the reason as given).
        self.end = end
        #: End a session whose upstream broke (counted and logged as an upstream failure).
        self.upstream_failed = upstream_failed

    async def run(self, s: GatewaySession, commands: Iterable[Command], out: Outlet | None = None) -> bool:
        """Carry out ``commands`` in order; False if an audit record could not be committed
        (the rest of the batch, its forward included, is not carried out).

        ``out`` defaults to the session's upstream, which delivers messages to the client
        outside any POST's answer."""
        if out is None:
            out = s.upstream
        barrier: asyncio.Future[None] | None = None
        for cmd in commands:
            match cmd:
                case RecordAudit():
                    try:
                        await self.audit.record(cmd.event)
                    except BastionError as e:
                        log.error("audit unavailable; refusing the request", extra={"error": e.message})
                        return False
                    if cmd.denied:
                        s.m.denied(cmd.denied)
                case ForwardToUpstream():
                    out.forward(cmd)
                case SendToClient():
                    if barrier is None:
                        out.to_client(cmd)
                    else:
                        out.to_client_after(barrier, cmd)
                case CompleteAudit():
                    try:
                        fut = self.audit.completing(
                            Completion(cmd.event_id, cmd.success, cmd.error, cmd.duration_ms)
                        )
                    except BastionError as e:
                        _outcome_lost(s.id, cmd.event_id, e)
                        continue
                    if out.defers:
                        fut.add_done_callback(functools.partial(_outcome_written, s.id, cmd.event_id))
                        barrier = fut
                    else:
                        try:
                            await fut
                        except BastionError as e:
                            _outcome_lost(s.id, cmd.event_id, e)
                case CloseSession():
                    log.info(
                        "session closed by the gateway",
                        extra={"session_id": s.id, "app": s.app.metadata.name, "reason": cmd.reason},
                    )
                    await self.end(s, cmd.reason)
                case Log():
                    log.log(
                        _LOG_LEVELS.get(cmd.level, logging.WARNING),
                        cmd.message,
                        extra={"session_id": s.id, **cmd.fields},
                    )
                case RecordPins():
                    if cmd.changed:
                        s.m.definition_changes.inc(len(cmd.changed))
                    if self.pins is not None:
                        self.pins.record(cmd)
                    else:
                        log.error("pinned tool definitions cannot be stored here", extra={"app": cmd.app})
                case CheckRate():
                    outcome = await self._take(cmd)
                    if not await self.run(s, s.engine.rate_checked(cmd.request_id, outcome), out):
                        return False
                case _:
                    assert_never(cmd)
        return True

    async def _take(self, cmd: CheckRate) -> tuple[RateRule, float] | None:
        """Draw from each bucket in turn; the first that is empty and its wait, or None."""
        for rule in cmd.rules:
            if self.rates is None:
                log.error("rate limits cannot be counted here; the call is refused", extra={"key": rule.key})
                return rule, 1.0
            try:
                wait = await self.rates.take(rule.key, rule.interval, rule.tolerance)
            except BastionError as e:
                # Fail closed, as with the audit log: a limit nobody can count is not lifted.
                log.error("rate limit counter unavailable; refusing the call", extra={"error": e.message})
                why = f"{rule.label}, which cannot be counted now ({e.message}): the gateway refuses the call"
                return RateRule(rule.key, rule.interval, rule.tolerance, why), 1.0
            if wait > 0.0:
                return rule, wait
        return None

    async def upstream_sent(self, s: GatewaySession, raw: bytes, out: Outlet | None = None) -> bool:
        """A message from the upstream: through the engine, then carried out."""
        cmds = s.engine.upstream_sent(raw)
        s.m.upstream(s.engine.last_method)
        return await self.run(s, cmds, out)

    async def fail_request(self, s: GatewaySession, request_id: Any, message: str) -> bytes:
        """Answer a forwarded request with an upstream error *through the engine*; the answer's bytes.

        The engine then completes the request's audit record as failed and frees its
        in-flight slot, exactly as if the upstream had answered with the error; a late real
        answer is dropped as unknown.
        """
        raw = jsonrpc.error_response(request_id, jsonrpc.INTERNAL_ERROR, message)
        got = Collected()
        await self.run(s, s.engine.upstream_sent(raw), got)
        return got.replies[0].raw if got.replies else raw
