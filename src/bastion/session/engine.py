"""The MCP session engine: RBAC, ``tools/list`` filtering and audit for one client session with one app.

Inputs are facts, each a method returning the commands to carry out, in order:

* :meth:`Session.client_sent` / :meth:`Session.upstream_sent`: one JSON-RPC
  message's bytes arrived from the client / the upstream MCP server;
* :meth:`Session.ended`: the session is over (client gone, upstream gone,
  revoked...); :meth:`Session.policy_changed`: the identity's roles changed;
  :meth:`Session.upstream_session_known`: the upstream named its own session.

Commands are orders: :class:`ForwardToUpstream`, :class:`SendToClient`,
:class:`RecordAudit`, :class:`CompleteAudit`, :class:`CloseSession`, :class:`Log`,
:class:`RecordPins`, :class:`CheckRate` (answered by :meth:`Session.rate_checked`).

The rules, and their reasons:

1. **Forward exactly what was decided.**  Every message is parsed once
   (:func:`~bastion.protocol.jsonrpc.parse_message` refuses ambiguous ones);
   decisions use that parse, and what is forwarded is its canonical
   serialisation (``Message.raw``): one line, so a newline-framed (stdio) or
   event-framed (SSE) peer reads one message per message judged.  Filtered
   ``tools/list`` results are re-serialised too.
2. **Every message is judged by its method, request or notification.**  A
   method that is a request in MCP (``tools/call``...) sent without an id is
   refused, never forwarded as a notification that escaped the tool check;
   client notifications outside :data:`CLIENT_NOTIFICATIONS` are refused too.
3. **Deny wins; the gateway answers for itself.**  A denied ``tools/call`` is
   never forwarded: the client gets a JSON-RPC error naming the tool and an
   audit event records the denial.  Bytes that do not parse are answered,
   recorded as ``mcp.session.invalid_request`` and never forwarded.
4. **Audit before forward.**  A :class:`RecordAudit` always comes before the
   :class:`ForwardToUpstream` it describes, and the runner must commit it
   durably before forwarding.  Each forwarded, audited request has exactly one
   event; its outcome arrives later as a :class:`CompleteAudit` for the same
   id (one row per call).  Requests the log would drown in (``ping`` and the
   ``*/list`` methods) are recorded only when they fail.
5. **Every response is matched.**  Client requests are tracked by id, at most
   ``max_in_flight`` at once; past that the gateway answers itself rather than
   forward a request whose response it could not match, because an unmatched
   ``tools/list`` result could not be filtered.  A response to an id the client
   never sent (or that was answered or cancelled) is dropped.
6. **Lists are lists.**  A filtered ``tools/list`` result always has
   ``"tools": [...]``, ``[]`` when nothing is allowed; a result the gateway
   cannot filter is replaced by an error, never passed on unfiltered.

7. **Nothing unbounded is stored or echoed.**  Tool names, methods, ids,
   params and upstream error texts enter events and answers through the caps
   of :mod:`bastion.audit.bound`.

8. **Resources, prompts and completions follow the role's ``mcp.resources``
   and ``mcp.prompts``** (decision 0043): their lists are filtered like
   ``tools/list`` (passed on as parsed when no rule restricts them), and
   ``resources/read``, ``resources/subscribe``, ``prompts/get`` and
   ``completion/complete`` outside the rules are refused and audited like a
   denied call.  A ``tools/call`` whose tool has argument rules (decision 0044)
   is judged on its arguments too; without rules, no per-call work is done.

9. **Pinned tool definitions** (decision 0045), for an app whose ``pinning`` is
   not ``off`` (the session is given a :class:`PinView`; ``None`` costs
   nothing): a ``tools/list`` result is judged against the app's pins after
   the RBAC filter (:func:`~bastion.policy.pins.review`); a changed or
   unapproved definition is hidden, each change is recorded as an
   ``mcp.tool.definition_changed`` event (once per new fingerprint) and new
   pins and changes are handed to the cluster as :class:`RecordPins`.  A
   ``tools/call`` of such a tool is refused like a denied tool.

10. **Rate limits** (decision 0051): a ``tools/call`` that draws from rate
    limit buckets (the role's ``mcp.rate_limits``, the app's ``rate_limit``)
    is held: the engine emits :class:`CheckRate` and goes on when told the
    outcome (:meth:`Session.rate_checked`): forwarded, or refused with
    ``retryAfter`` and audited.  Sessions with no limit do no per-call work.

Not decided here: server-to-client requests and notifications pass
through (re-serialised) and are not audited.  A client's response is
forwarded only when it answers an open request of the upstream; any other is
refused and audited.

This module must not do I/O, await, read the wall clock (use the injected
clock) or log directly (emit :class:`Log`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from typing import Any, Final, Protocol

from bastion._time import Clock
from bastion.audit import events as ev
from bastion.audit.bound import MAX_ERROR, MAX_NAME, MAX_QUOTE, clip, clip_params
from bastion.audit.events import AuditEvent
from bastion.identity import Identity
from bastion.policy.limits import AppRateLimit, RateRule
from bastion.policy.pins import MAX_DIFF_LINES, AppPins, Change, Pin, PinMode, call_refusal, review
from bastion.policy.rbac import Decision
from bastion.protocol.jsonrpc import (
    ACCESS_DENIED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    TOO_MANY_REQUESTS,
    UPSTREAM_UNAVAILABLE,
    Message,
    ProtocolError,
    RequestId,
    error_response,
    fold_key,
    notification,
    parse_message,
    result_response,
)
from bastion.resources import App

__all__ = [
    "CLIENT_NOTIFICATIONS",
    "QUIET_METHODS",
    "CheckRate",
    "CloseSession",
    "Command",
    "CompleteAudit",
    "EventIds",
    "ForwardToUpstream",
    "Log",
    "PinView",
    "RecordAudit",
    "RecordPins",
    "SendToClient",
    "Session",
    "ToolPolicy",
]

# ------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class ForwardToUpstream:
    """Send ``raw`` (the client's original bytes) to the upstream MCP server."""

    raw: bytes
    message: Message


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send ``raw`` to the client: the upstream's message (possibly filtered) or one the gateway made.

    ``related_request_id`` is the id of the client request this answers
    (``None`` for notifications and server-to-client requests), for transports
    that route messages to the stream of a request.
    """

    raw: bytes
    related_request_id: Any = None


@dataclass(frozen=True, slots=True)
class RecordAudit:
    """Store ``event``.  Commit it durably before carrying out any later :class:`ForwardToUpstream`.

    ``denied`` is ``"tool"`` or ``"app"`` when the event records a request the
    gateway refused by policy (for metrics; not part of equality).
    """

    event: AuditEvent
    denied: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class CompleteAudit:
    """Update the stored event ``event_id`` in place with the outcome of its request."""

    event_id: str
    success: bool
    error: str
    duration_ms: float


@dataclass(frozen=True, slots=True)
class CloseSession:
    """End the session (close the client connection and the upstream); then report :meth:`Session.ended`."""

    reason: str


@dataclass(frozen=True, slots=True)
class Log:
    """Write an operational log line (not an audit record): something odd, worth a look."""

    level: str
    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RecordPins:
    """Store, for the cluster, pins first seen (``new``) and served definitions that differ from
    their pins (``changed``) on app ``app`` (decision 0045).  Not a condition of anything later in
    the batch: what to hide and refuse was decided already."""

    app: str
    new: tuple[Pin, ...] = ()
    changed: tuple[Change, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckRate:
    """Draw one token from each of ``rules`` (in order, stopping at the first that has none) for
    the client request ``request_id``; then report :meth:`Session.rate_checked`.  Nothing of the
    request is carried out before that (decision 0051)."""

    request_id: RequestId
    rules: tuple[RateRule, ...]


Command = (
    ForwardToUpstream
    | SendToClient
    | RecordAudit
    | CompleteAudit
    | CloseSession
    | Log
    | RecordPins
    | CheckRate
)


class PinView(Protocol):
    """The cluster's pins of the session's app, as this process knows them now (decision 0045)."""

    @property
    def mode(self) -> PinMode: ...

    def current(self) -> AppPins: ...


class ToolPolicy(Protocol):
    """What the engine asks of the access checker (:class:`~bastion.policy.AccessChecker` is one)."""

    @property
    def role_names(self) -> tuple[str, ...]: ...

    def app_decision(self, app: App) -> Decision: ...

    def check_tool(self, app: App, tool: str) -> Decision: ...

    def filter_tools(self, app: App, tools: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]: ...

    def check_resource(self, app: App, uri: str) -> Decision: ...

    def check_resource_template(self, app: App, template: str) -> Decision: ...

    def check_prompt(self, app: App, name: str) -> Decision: ...

    def filter_listed(self, app: App, method: str, entries: Sequence[Any]) -> list[Any] | None: ...

    @property
    def any_rate_limits(self) -> bool: ...

    def rate_limits(self, app: App, tool: str, user: str) -> tuple[RateRule, ...]: ...


#: Lines of a definition diff kept in an audit event, and characters per line.
_AUDIT_DIFF_LINES: Final = min(MAX_DIFF_LINES, 80)
_AUDIT_DIFF_LINE: Final = 240

#: Requests recorded only when they fail: frequent, read-only, and uninteresting when they work.
QUIET_METHODS: Final = frozenset(
    {"ping", "tools/list", "resources/list", "resources/templates/list", "prompts/list"}
)

#: The notifications an MCP client may send its server (2025-06-18 to 2026-07-28).  Any other
#: method without an id is refused: a request sent as a notification would escape the checks
#: requests get (finding F4: a ``tools/call`` without an id reached upstreams that ran it).
CLIENT_NOTIFICATIONS: Final = frozenset(
    {
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
    }
)

#: Requests judged by the role's mcp.resources / mcp.prompts (decision 0043); see _content_refusal.
_CONTENT_METHODS: Final = frozenset(
    {"resources/read", "resources/subscribe", "prompts/get", "completion/complete", "subscriptions/listen"}
)
#: List results filtered by those rules: method -> the result's list member.
_CONTENT_LISTS: Final = {
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
    "prompts/list": "prompts",
}

#: The member of each listed entry the rules judge.
_KEY_OF: Final = {"resources": "uri", "resourceTemplates": "uriTemplate", "prompts": "name"}

_LIST_CHANGED: Final = notification("notifications/tools/list_changed")
#: What a client that listed these is told when the identity's roles change (decision 0043).
_CONTENT_LIST_CHANGED: Final = {
    "resources/list": notification("notifications/resources/list_changed"),
    "prompts/list": notification("notifications/prompts/list_changed"),
}
# 2026-07-28 has no initialize: the client describes itself in every request's _meta.
_META_CLIENT_INFO: Final = "io.modelcontextprotocol/clientInfo"
_META_PROTOCOL_VERSION: Final = "io.modelcontextprotocol/protocolVersion"


def _same(value: Any) -> Any:
    return value


# ------------------------------------------------------------ audit event ids


class _EventIds:
    """Unique event ids in the uuid4 hex layout, without a system call per event.

    ``uuid.uuid4()`` reads the OS random source and builds a UUID object every
    time (several microseconds, measured).  Here 90 random bits are drawn once
    per instance (and again every 2**32 events) and a counter fills the low 32
    bits.  Ids need to be unique, not unpredictable: they are not secrets.  One
    instance may serve many sessions fed from one thread (the MCP handler shares
    one, which saves a random draw per session): their events' ids then ascend
    together instead of starting from a random place per session.
    """

    __slots__ = ("_base", "_n")

    _VERSION_AND_VARIANT: Final = (0x4 << 76) | (0x2 << 62)
    _RANDOM_BITS: Final = ((1 << 128) - 1) & ~(0xF << 76) & ~(0x3 << 62) & ~0xFFFFFFFF

    def __init__(self) -> None:
        self._reseed()

    def _reseed(self) -> None:
        random = int.from_bytes(os.urandom(16), "big") & self._RANDOM_BITS
        self._base = random | self._VERSION_AND_VARIANT
        self._n = 0

    def next(self) -> str:
        n = self._n
        if n > 0xFFFFFFFF:
            self._reseed()
            n = 0
        self._n = n + 1
        return "%032x" % (self._base + n)


#: Public name for callers that share one id source between sessions.
EventIds = _EventIds

# ------------------------------------------------------- fast event building

_AUDIT_FIELDS: Final = fields(AuditEvent)
# Every field, in field order (to_dict() and repr() follow that order).
_EVENT_TEMPLATE: Final[dict[str, Any]] = {
    f.name: (None if f.default is MISSING else f.default) for f in _AUDIT_FIELDS
}
# Fields with a default factory (headers, extra) get a fresh value per event.
_FACTORIES: Final = tuple(
    (f.name, f.default_factory) for f in _AUDIT_FIELDS if f.default_factory is not MISSING
)
# Building an AuditEvent through its generated __init__ costs ~10 us here
# (measured): twenty-odd object.__setattr__ calls, because it is frozen.  It
# is a plain (non-slots) dataclass without __post_init__, so an instance is
# exactly its __dict__, in field order; we hand it that dict directly.  If the
# class ever changes shape, the constructor is used (a test compares both).
_FAST_EVENTS: Final = "__slots__" not in vars(AuditEvent) and not hasattr(AuditEvent, "__post_init__")
_new_object = object.__new__
_set_attr = object.__setattr__


# ---------------------------------------------------------------- the engine


class _Pending:
    """A client request forwarded upstream and not yet answered."""

    __slots__ = ("cancelled", "event_id", "message", "method", "started")

    def __init__(self, method: str, event_id: str | None, started: datetime, message: Message | None) -> None:
        self.method = method
        #: The audit event to complete, or None for a quiet method.
        self.event_id = event_id
        self.started = started
        #: Kept only for quiet methods, to record them if they fail.
        self.message = message
        #: The client cancelled it; its id stays reserved until the upstream answers.
        self.cancelled = False


def _ms(start: datetime, end: datetime) -> float:
    # The clock is wall time; never report a negative duration if it stepped back.
    return max((end - start).total_seconds() * 1000.0, 0.0)


def _error_text(error: dict[str, Any]) -> str:
    message = error.get("message")
    if isinstance(message, str) and message:
        return clip(message, MAX_ERROR)
    return clip(f"error code {error.get('code')!r}", MAX_ERROR)


def _tool_is_unambiguous(tool: Mapping[str, Any]) -> bool:
    # A case variant of "name" in a tool entry could be read as the name by a
    # case-insensitive client; such an entry is dropped like a nameless one.
    return all(k == "name" or fold_key(k) != "name" for k in tool)


class Session:
    """One MCP client session with one app, as a state machine.  See the module docstring.

    ``redact`` is applied to request params before they enter an audit event.
    ``new_id`` makes audit event ids (tests pass a deterministic one).  Not
    thread-safe: feed one session from one task.
    """

    def __init__(
        self,
        *,
        app: App,
        checker: ToolPolicy,
        identity: Identity,
        session_id: str,
        cluster_name: str,
        transport: str,
        clock: Clock,
        redact: Callable[[Any], Any] = _same,
        max_in_flight: int = 1024,
        remote_addr: str = "",
        new_id: Callable[[], str] | None = None,
        pins: PinView | None = None,
    ) -> None:
        if max_in_flight <= 0:
            raise ValueError("max_in_flight must be positive")
        self._app = app
        self._app_name = app.metadata.name
        self._checker = checker
        self._identity = identity
        self._session_id = session_id
        self._cluster_name = cluster_name
        self._transport = transport
        self._clock = clock
        self._redact = redact
        self._max_in_flight = max_in_flight
        self._remote_addr = remote_addr
        self._new_id: Callable[[], str] = new_id if new_id is not None else _EventIds().next
        self._inflight: dict[RequestId, _Pending] = {}
        #: Ids of the upstream's requests to the client not answered yet (oldest first).
        self._asked: dict[RequestId, bool] = {}
        self._cancelled = 0  # how many of _inflight are cancelled
        self._started_at = clock.now()
        self._start_pending = True
        self._closed = False
        self._headers: dict[str, str] | None = None
        self._initialized = False  # an initialize result reached the client
        #: resources/list, prompts/list if the client asked: told to list again on a role change.
        self._listed: set[str] = set()
        self._client_info = ""
        self._server_info = ""
        self._protocol_version = ""
        self._upstream_session_id = ""
        self._base: dict[str, Any] | None = None  # the fields every event shares
        #: The method of the last message fed in, for metrics: a request's or
        #: notification's own, for a response the method of the request it
        #: answers ("response" if not ours to know), "" if it did not parse.
        self.last_method = ""
        decision = checker.app_decision(app)
        self._app_denial: Decision | None = None if decision.allowed else decision
        #: Pinned tool definitions (decision 0045); None: the app does not pin.
        self._pins = pins
        #: The fingerprint each tool was last listed with in this session.
        self._pin_served: dict[str, str] = {}
        #: (tool, fingerprint) changes this session recorded already.
        self._pin_reported: set[tuple[str, str]] = set()
        #: Rate limits (decision 0051): the app's own, and requests waiting for CheckRate.
        self._app_limit = AppRateLimit.of(app)
        self._rated = checker.any_rate_limits or self._app_limit is not None
        self._rate_wait: dict[RequestId, Message] = {}

    # ------------------------------------------------------------ properties

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def client_info(self) -> str:
        """``name/version`` from the client's ``initialize`` (``""`` until then)."""
        return self._client_info

    @property
    def server_info(self) -> str:
        """``name/version`` from the upstream's ``initialize`` result (``""`` until then)."""
        return self._server_info

    @property
    def protocol_version(self) -> str:
        """The negotiated protocol version (the client's request until the result arrives)."""
        return self._protocol_version

    @property
    def in_flight(self) -> int:
        """Client requests forwarded and not yet answered (cancelled ones included)."""
        return len(self._inflight)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------- inputs

    def client_sent(
        self,
        raw: bytes,
        headers: dict[str, str] | None = None,
        *,
        parsed: Message | ProtocolError | None = None,
    ) -> list[Command]:
        """The client sent one JSON-RPC message, ``raw``.  ``parsed``: what ``parse_message`` made
        of it, when the transport parsed it already (a message is parsed once).  ``headers``: its
        redacted HTTP headers, if any, recorded on the audit events this message causes.

        At most one :class:`ForwardToUpstream` results, and it comes last."""
        self._headers = headers
        try:
            return self._client_sent(raw, parsed)
        finally:
            self._headers = None

    def _client_sent(self, raw: bytes, parsed: Message | ProtocolError | None) -> list[Command]:
        if self._closed:
            return [Log("debug", "client message after the session ended; dropped", {"size": len(raw)})]
        if parsed is None:
            try:
                parsed = parse_message(raw)
            except ProtocolError as e:
                parsed = e
        if isinstance(parsed, ProtocolError):
            self.last_method = ""
            return self._client_invalid(raw, parsed)
        msg = parsed
        self.last_method = msg.method or "response"
        if self._app_denial is not None:
            return self._app_denied(msg)
        kind = msg.kind
        if kind == "request":
            return self._client_request(msg)
        if kind == "notification":
            return self._client_notification(msg)
        # A response to a server-to-client request (sampling, elicitation, roots): forwarded
        # as parsed, like every other message, and only if the upstream asked.
        if self._asked.pop(msg.id, False):
            return [ForwardToUpstream(msg.raw, msg)]
        return self._refuse_response(msg)

    def upstream_sent(self, raw: bytes) -> list[Command]:
        """The upstream MCP server sent one JSON-RPC message."""
        if self._closed:
            return [Log("debug", "upstream message after the session ended; dropped", {"size": len(raw)})]
        try:
            msg = parse_message(raw)
        except ProtocolError as e:
            self.last_method = ""
            return self._upstream_invalid(e)
        self.last_method = msg.method or "response"
        kind = msg.kind
        if kind == "response" or kind == "error":
            return self._upstream_response(msg)
        # Notifications (tools/list_changed included: the client re-lists and is
        # filtered again) and server-to-client requests pass through, as parsed.
        if kind == "request":
            asked = self._asked
            if len(asked) >= self._max_in_flight:  # bounded: the oldest question is forgotten
                del asked[next(iter(asked))]
            asked[msg.id] = True
        return [SendToClient(msg.raw)]

    def ended(self, error: str = "") -> list[Command]:
        """The session is over; ``error`` says why if it ended abnormally.  Later inputs are ignored.

        Requests still waiting are failed: their audit events completed, and
        the client answered (the runner delivers that if the client is still there).
        """
        if self._closed:
            return []
        self._closed = True
        now = self._clock.now()
        out: list[Command] = []
        why = f"the session ended before the upstream MCP server answered ({error or 'closed'})"
        for rid, pending in self._inflight.items():
            if pending.cancelled:
                continue
            self._failed(pending, rid, why, _ms(pending.started, now), out)
            out.append(SendToClient(error_response(rid, UPSTREAM_UNAVAILABLE, why), rid))
        self._inflight.clear()
        self._cancelled = 0
        self._flush_start(out)
        out.append(RecordAudit(self._event(ev.SESSION_END, not error, now, error=error)))
        return out

    def policy_changed(self, checker: ToolPolicy) -> list[Command]:
        """The identity's roles changed: decide with ``checker`` from now on.

        If the app is still allowed, the client is told ``tools/list_changed``
        (and ``resources/list_changed`` / ``prompts/list_changed`` if it listed
        those) so that it lists again and gets the new filter (Teleport does not
        do this).  If it is not, the session is closed.
        """
        if self._closed:
            return []
        self._checker = checker
        self._rated = checker.any_rate_limits or self._app_limit is not None
        self._base = None  # roles are in every event
        decision = checker.app_decision(self._app)
        if not decision.allowed:
            self._app_denial = decision
            return [CloseSession(f"access to app {self._app_name!r} was revoked: {decision.reason}")]
        self._app_denial = None
        if not self._initialized:
            return []
        # Templates have no notification of their own: resources/list_changed covers them.
        out: list[Command] = [SendToClient(_LIST_CHANGED)]
        out.extend(
            SendToClient(raw) for method, raw in _CONTENT_LIST_CHANGED.items() if method in self._listed
        )
        return out

    def upstream_session_known(self, upstream_session_id: str) -> list[Command]:
        """The upstream's own session id (``Mcp-Session-Id``, SSE session) is known; events carry it."""
        self._upstream_session_id = clip(upstream_session_id, MAX_NAME)  # an upstream's: in every event
        self._base = None
        return []

    # ------------------------------------------------------- client requests

    def _client_request(self, msg: Message) -> list[Command]:
        rid = msg.id
        method = msg.method or ""  # a string: parse_message checked (the "or" is for mypy)
        inflight = self._inflight
        if rid in inflight or (self._rate_wait and rid in self._rate_wait):
            return self._refuse(
                msg,
                INVALID_REQUEST,
                f"request id {rid!r} is already in use by a request in flight in this session; "
                "use a new id for each request",
                event_type=ev.INVALID_REQUEST,
            )
        if len(inflight) >= self._max_in_flight and not self._evict_cancelled():
            return self._refuse(
                msg,
                TOO_MANY_REQUESTS,
                f"too many requests in flight in this session (limit {self._max_in_flight}); "
                "wait for some to be answered",
            )
        now = self._clock.now()
        if self._start_pending and not self._client_info and method != "initialize":
            self._note_meta(msg.params)
        tool = ""
        if method == "tools/call":
            params = msg.params
            name = params.get("name") if params is not None else None
            if type(name) is not str:
                return self._refuse(
                    msg, INVALID_PARAMS, 'tools/call needs "params.name": the tool name, a string'
                )
            if len(name) > MAX_NAME:
                return self._refuse(
                    msg,
                    INVALID_PARAMS,
                    f"the tool name is {len(name)} characters long; at most {MAX_NAME} are accepted",
                    tool=clip(name, MAX_QUOTE),
                )
            decision = self._checker.check_tool(self._app, name)
            if not decision.allowed:
                return self._deny_tool(msg, name, decision)
            if decision.check_arguments is not None:  # argument rules apply (decision 0044)
                arguments = params.get("arguments")  # type: ignore[union-attr]  # params holds the name
                decision = decision.check_arguments(arguments, self._identity.username)
                if not decision.allowed:
                    return self._deny_tool(msg, name, decision, by_arguments=True)
            if self._pins is not None:
                refused = self._pin_refusal(msg, name)
                if refused is not None:
                    return refused
            if self._rated:
                rules = self._checker.rate_limits(self._app, name, self._identity.username)
                app_rule = self._app_limit.for_tool(name) if self._app_limit is not None else None
                if app_rule is not None:
                    rules = (*rules, app_rule)
                if rules:
                    self._rate_wait[rid] = msg
                    return [CheckRate(rid, rules)]
            tool = name
        elif method == "initialize":
            self._note_initialize(msg.params)
        elif method in _CONTENT_METHODS:
            refused = self._content_refusal(msg, method)
            if refused is not None:
                return refused
        return self._admit(msg, method, tool, now)

    def _admit(self, msg: Message, method: str, tool: str, now: datetime) -> list[Command]:
        """Forward a request that passed every check: tracked, audited first unless quiet."""
        rid = msg.id
        inflight = self._inflight
        if method in QUIET_METHODS:
            if method in _CONTENT_LIST_CHANGED:
                self._listed.add(method)
            inflight[rid] = _Pending(method, None, now, msg)
            return [ForwardToUpstream(msg.raw, msg)]
        # The start event waits for the initialize result (for server_info);
        # any other event flushes it first.
        start = self._start_event() if self._start_pending and method != "initialize" else None
        event = self._event(ev.REQUEST, True, now, msg, tool=tool)
        inflight[rid] = _Pending(method, event.id, now, None)
        forward = ForwardToUpstream(msg.raw, msg)
        if start is not None:
            return [RecordAudit(start), RecordAudit(event), forward]
        return [RecordAudit(event), forward]

    def rate_checked(self, request_id: RequestId, refusal: tuple[RateRule, float] | None) -> list[Command]:
        """The outcome of a :class:`CheckRate`: None (a token from every bucket: go on), or the
        bucket that had none and the seconds until it has one (refused, ``retryAfter``)."""
        msg = self._rate_wait.pop(request_id, None)
        if msg is None:
            return []
        if self._closed:
            text = "the session ended before the call was carried out"
            return [SendToClient(error_response(msg.id, UPSTREAM_UNAVAILABLE, text), msg.id)]
        params = msg.params or {}
        tool = str(params.get("name", ""))
        if refusal is None:
            return self._admit(msg, "tools/call", tool, self._clock.now())
        rule, wait = refusal
        retry = round(max(wait, 0.001), 3)
        text = (
            f'rate limit reached for tool "{clip(tool, MAX_QUOTE)}" on app "{self._app_name}": '
            f"{rule.label}; retry after {retry} s"
        )
        return self._refuse(
            msg,
            TOO_MANY_REQUESTS,
            text,
            tool=tool,
            audit_error=f"rate limited: {rule.label}; retry after {retry} s",
            denied="rate",
            data={"retryAfter": retry},
        )

    def _deny_tool(
        self, msg: Message, tool: str, decision: Decision, *, by_arguments: bool = False
    ) -> list[Command]:
        """Refuse a ``tools/call`` for its tool (by name) or, ``by_arguments``, its arguments (0044)."""
        app, user, shown = self._app_name, self._identity.username, clip(tool, MAX_QUOTE)
        if by_arguments:
            text = (
                f'tool "{shown}" may not be called with these arguments by user "{user}" on app "{app}": '
                f"{decision.reason}"
            )
        else:
            text = (
                f'tool "{shown}" is not allowed for user "{user}" on app "{app}": '
                f"{decision.reason}. Run `bastion mcp tools {app}` to see the tools you may call."
            )
        return self._refuse(
            msg,
            INVALID_PARAMS,
            text,
            tool=tool,
            audit_error=f"access denied: {decision.reason}",
            denied="arguments" if by_arguments else "tool",
        )

    def _content_refusal(self, msg: Message, method: str) -> list[Command] | None:
        """Judge a resource, prompt or completion request by the role's rules (decision 0043);
        the commands refusing it, or None to forward it.  A request the rules cannot judge (no
        URI, no name) is refused too: what is forwarded is what was judged."""
        params = msg.params or {}
        checker, app = self._checker, self._app
        kind = "prompt" if method == "prompts/get" else "resource"
        if method == "prompts/get":
            name = params.get("name")
            decision = checker.check_prompt(app, name) if type(name) is str else None
            missing = 'prompts/get needs "params.name": the prompt name, a string'
        elif method == "completion/complete":
            ref = params.get("ref")
            if type(ref) is not dict:
                ref = {}
            ref_type = ref.get("type")
            if ref_type == "ref/prompt":
                kind, name = "prompt", ref.get("name")
                decision = checker.check_prompt(app, name) if type(name) is str else None
            elif ref_type == "ref/resource":
                uri = ref.get("uri")
                decision = checker.check_resource_template(app, uri) if type(uri) is str else None
            else:
                decision = None
            missing = (
                'completion/complete needs "params.ref": {"type": "ref/prompt", "name": ...} '
                'or {"type": "ref/resource", "uri": ...}'
            )
        elif method == "subscriptions/listen":  # 2026-07-28: resource subscriptions ride here
            decision, missing = _listen_decision(checker, app, params)
            if decision is None and not missing:
                return None  # no resource subscriptions: nothing for these rules
        else:
            uri = params.get("uri")
            decision = checker.check_resource(app, uri) if type(uri) is str else None
            missing = f'{method} needs "params.uri": the resource URI, a string'
        if decision is None:
            return self._refuse(msg, INVALID_PARAMS, missing)
        if decision.allowed:
            return None
        text = (
            f'{method} refused for user "{self._identity.username}" on app "{self._app_name}": '
            f"{decision.reason}"
        )
        audit = f"access denied: {decision.reason}"
        return self._refuse(msg, INVALID_PARAMS, text, audit_error=audit, denied=kind)

    def _refuse(
        self,
        msg: Message,
        code: int,
        text: str,
        *,
        event_type: str = ev.REQUEST,
        tool: str = "",
        audit_error: str = "",
        denied: str = "",
        data: Any = None,
    ) -> list[Command]:
        """Answer a client request ourselves, with an audit event of the failure; nothing is forwarded."""
        now = self._clock.now()
        out: list[Command] = []
        self._flush_start(out)
        event = self._event(
            event_type, False, now, msg, tool=tool, error=audit_error or text, duration_ms=0.0
        )
        out.append(RecordAudit(event, denied))
        out.append(SendToClient(error_response(msg.id, code, text, data), msg.id))
        return out

    def _evict_cancelled(self) -> bool:
        """Free the slot of the oldest cancelled request, if any (its late answer is then unmatched)."""
        if not self._cancelled:
            return False
        for rid, pending in self._inflight.items():
            if pending.cancelled:
                del self._inflight[rid]
                self._cancelled -= 1
                return True
        return False  # pragma: no cover - _cancelled counts entries of _inflight

    def _note_initialize(self, params: dict[str, Any] | None) -> None:
        if params is None:
            return
        info = params.get("clientInfo")
        if isinstance(info, dict):
            self._client_info = _name_version(info)
        version = params.get("protocolVersion")
        if isinstance(version, str):
            self._protocol_version = clip(version, MAX_NAME)
        self._base = None

    def _note_meta(self, params: dict[str, Any] | None) -> None:
        meta = params.get("_meta") if params is not None else None
        if not isinstance(meta, dict):
            return
        info = meta.get(_META_CLIENT_INFO)
        if isinstance(info, dict):
            self._client_info = _name_version(info)
            self._base = None
        version = meta.get(_META_PROTOCOL_VERSION)
        if isinstance(version, str):
            self._protocol_version = clip(version, MAX_NAME)
            self._base = None

    # -------------------------------------------------- client notifications

    def _client_notification(self, msg: Message) -> list[Command]:
        if msg.method not in CLIENT_NOTIFICATIONS:
            return self._refuse_notification(msg)
        now = self._clock.now()
        out: list[Command] = []
        if self._start_pending and not self._client_info:
            self._note_meta(msg.params)
        self._flush_start(out)
        out.append(RecordAudit(self._event(ev.NOTIFICATION, True, now, msg)))
        if msg.method == "notifications/cancelled" and msg.params is not None:
            self._cancel(msg.params.get("requestId"), now, out)
        out.append(ForwardToUpstream(msg.raw, msg))
        return out

    def _refuse_notification(self, msg: Message) -> list[Command]:
        """No id, and not a client notification: audited, answered, never forwarded."""
        method = msg.method or ""
        if method.startswith("notifications/"):
            text = f"{method!r} is not a notification an MCP client may send; not forwarded"
        else:
            text = (
                f"{method!r} is a request, and a request needs an id: "
                "the gateway does not forward requests sent as notifications"
            )
        return self._refuse_unanswerable(msg, text)

    def _refuse_unanswerable(self, msg: Message, text: str) -> list[Command]:
        """Refuse a message that has no id to answer: audited, answered with id null, not forwarded."""
        now = self._clock.now()
        out: list[Command] = []
        self._flush_start(out)
        out.append(RecordAudit(self._event(ev.INVALID_REQUEST, False, now, msg, error=text, duration_ms=0.0)))
        out.append(SendToClient(error_response(None, INVALID_REQUEST, text)))
        return out

    def _refuse_response(self, msg: Message) -> list[Command]:
        """A client response to no open request of the upstream: audited, answered, never forwarded.

        Otherwise a client could send the upstream anything as the "result" of a
        question it never asked: a channel no policy judges and no record shows.
        """
        text = (
            f"response to request id {clip(repr(msg.id), MAX_QUOTE)}, which the upstream MCP server did "
            "not send or which was already answered; not forwarded"
        )
        return self._refuse_unanswerable(msg, text)

    def _cancel(self, rid: Any, now: datetime, out: list[Command]) -> None:
        # The upstream SHOULD NOT answer a cancelled request, so its audit event
        # is completed now.  The id stays reserved: if the upstream answers
        # after all, that answer must not be matched to a new request that
        # reuses the id (a late tools/list result would then go out unfiltered).
        if type(rid) is not int and type(rid) is not str:
            return
        pending = self._inflight.get(rid)
        if pending is None or pending.cancelled:
            return
        pending.cancelled = True
        self._cancelled += 1
        if pending.event_id is not None:
            out.append(
                CompleteAudit(pending.event_id, False, "cancelled by the client", _ms(pending.started, now))
            )

    # ------------------------------------------------- invalid or denied input

    def _client_invalid(self, raw: bytes, e: ProtocolError) -> list[Command]:
        now = self._clock.now()
        out: list[Command] = []
        self._flush_start(out)
        event = self._event(
            ev.INVALID_REQUEST,
            False,
            now,
            method=e.method or "",
            request_id=e.id,
            error=e.message,
            extra={"size": len(raw), "rpc_code": e.rpc_code},
        )
        out.append(RecordAudit(event))
        out.append(SendToClient(error_response(e.id, e.rpc_code, e.message), e.id))
        return out

    def _app_denied(self, msg: Message) -> list[Command]:
        reason = self._app_denial.reason if self._app_denial is not None else ""
        if msg.kind != "request":
            return [Log("info", "dropped a client message: the app is not accessible", {"reason": reason})]
        text = f'user "{self._identity.username}" may not use app "{self._app_name}": {reason}'
        return self._refuse(msg, ACCESS_DENIED, text, audit_error=f"access denied: {reason}", denied="app")

    def _upstream_invalid(self, e: ProtocolError) -> list[Command]:
        rid = e.id
        pending = self._inflight.get(rid) if e.method is None and rid is not None else None
        if pending is None or pending.cancelled:
            return [
                Log(
                    "warning", "dropped an invalid message from the upstream", {"error": e.message, "id": rid}
                )
            ]
        # It looks like the answer to a request we track: fail that request
        # rather than leave the client waiting forever.
        del self._inflight[rid]
        now = self._clock.now()
        out: list[Command] = []
        text = f"the upstream MCP server sent an invalid response: {e.message}"
        self._failed(pending, rid, text, _ms(pending.started, now), out)
        out.append(SendToClient(error_response(rid, INTERNAL_ERROR, text), rid))
        return out

    # ----------------------------------------------------- upstream responses

    def _upstream_response(self, msg: Message) -> list[Command]:
        rid = msg.id
        pending = self._inflight.pop(rid, None)
        if pending is None:
            return [
                Log(
                    "warning",
                    "dropped a response from the upstream to a request the client did not send "
                    "or that was already answered",
                    {"id": rid},
                )
            ]
        method = self.last_method = pending.method
        if pending.cancelled:
            self._cancelled -= 1
            return [Log("debug", "dropped the upstream's response to a cancelled request", {"id": rid})]
        now = self._clock.now()
        ms = (now - pending.started).total_seconds() * 1000.0  # _ms(), inlined: the hot path
        if ms < 0.0:
            ms = 0.0
        out: list[Command] = []
        if method == "initialize":
            self._initialize_answered(msg, out)
        if msg.kind == "error":
            self._failed(pending, rid, _error_text(msg.body["error"]), ms, out)
            out.append(SendToClient(msg.raw, rid))
            return out
        raw = msg.raw
        if method == "tools/list":
            filtered = self._filter_tools_list(msg, out)
            if filtered is None:
                text = (
                    "the upstream MCP server sent a tools/list result without a tools list; "
                    "the gateway does not pass on tool lists it cannot filter"
                )
                self._failed(pending, rid, text, ms, out)
                out.append(SendToClient(error_response(rid, INTERNAL_ERROR, text), rid))
                return out
            raw = filtered
        elif method in _CONTENT_LISTS:
            listed = self._filter_content_list(msg, method)
            if listed is None:
                text = (
                    f"the upstream MCP server sent a {method} result without a "
                    f"{_CONTENT_LISTS[method]} list; the gateway does not pass on lists it cannot filter"
                )
                self._failed(pending, rid, text, ms, out)
                out.append(SendToClient(error_response(rid, INTERNAL_ERROR, text), rid))
                return out
            raw = listed
        if pending.event_id is not None:
            out.append(CompleteAudit(pending.event_id, True, "", ms))
        out.append(SendToClient(raw, rid))
        return out

    def _failed(self, pending: _Pending, rid: RequestId, error: str, ms: float, out: list[Command]) -> None:
        """Record that a tracked request failed: complete its event, or record a quiet one now."""
        if pending.event_id is not None:
            out.append(CompleteAudit(pending.event_id, False, error, ms))
            return
        self._flush_start(out)
        event = self._event(
            ev.REQUEST, False, pending.started, pending.message, request_id=rid, error=error, duration_ms=ms
        )
        out.append(RecordAudit(event))

    def _filter_tools_list(self, msg: Message, cmds: list[Command]) -> bytes | None:
        """The result with only the allowed tools, re-serialised; None if it has no tools list.

        Always re-serialised, even when every tool is allowed: what the client
        reads is then exactly what was checked, whatever duplicate or
        case-variant members the upstream's bytes held.
        """
        result = msg.body.get("result")
        if type(result) is not dict:
            return None
        tools = result.get("tools")
        if type(tools) is not list:
            return None
        kept = [t for t in self._checker.filter_tools(self._app, tools) if _tool_is_unambiguous(t)]
        if self._pins is not None:
            kept = self._review_pins(kept, cmds)
        # Keep nextCursor, _meta and the rest; drop case variants of "tools".
        out = {k: v for k, v in result.items() if k == "tools" or fold_key(k) != "tools"}
        out["tools"] = kept
        return result_response(msg.id, out)

    def _review_pins(self, tools: list[Mapping[str, Any]], out: list[Command]) -> list[Mapping[str, Any]]:
        """Judge listed tools against the app's pins (decision 0045): the ones to show; each change
        not recorded yet is audited, and new pins and changes go to the cluster (RecordPins)."""
        assert self._pins is not None
        known = self._pins.current()
        r = review(known.pins, tools, self._pins.mode)
        served = self._pin_served
        for pin in r.new:
            served[pin.tool] = pin.fingerprint
        for entry in r.visible:
            name = entry["name"]
            if name in known.pins:
                served[name] = known.pins[name].fingerprint
        fresh: list[Change] = []
        for ch in r.changed:
            tool, fp = ch.pin.tool, ch.served_fingerprint
            served[tool] = fp
            if known.served.get(tool) == fp or (tool, fp) in self._pin_reported:
                continue  # recorded already (by this session or anywhere in the cluster)
            if len(self._pin_reported) >= self._max_in_flight:  # bounded: a server flipping forever
                self._pin_reported.clear()
            self._pin_reported.add((tool, fp))
            fresh.append(ch)
        for pin in r.new:
            if not pin.approved:
                served.pop(pin.tool, None)  # waiting: call_refusal says why from the pin
        if fresh:
            now = self._clock.now()
            self._flush_start(out)
            for ch in fresh:
                lines = [clip(line, _AUDIT_DIFF_LINE) for line in ch.diff[:_AUDIT_DIFF_LINES]]
                text = (
                    f'tool "{clip(ch.pin.tool, MAX_QUOTE)}" changed its definition since it was pinned; '
                    "hidden and refused until an administrator approves it"
                )
                extra = {"pinned": ch.pin.fingerprint, "served": ch.served_fingerprint, "diff": lines}
                event = self._event(
                    ev.TOOL_DEFINITION_CHANGED,
                    False,
                    now,
                    method="tools/list",
                    tool=clip(ch.pin.tool, MAX_NAME),
                    error=text,
                    extra=extra,
                )
                out.append(RecordAudit(event))
        if r.new or fresh:
            out.append(RecordPins(self._app_name, r.new, tuple(fresh)))
        return r.visible

    def _pin_refusal(self, msg: Message, tool: str) -> list[Command] | None:
        """Refuse a call to a tool whose definition changed or waits for approval (decision 0045),
        as this session listed it or as the cluster saw it served; None to go on."""
        assert self._pins is not None
        known = self._pins.current()
        mode = self._pins.mode
        why = call_refusal(known.pins, self._pin_served, tool, mode) or call_refusal(
            known.pins, known.served, tool, mode
        )
        if why is None:
            return None
        text = f'{why} (app "{self._app_name}")'
        return self._refuse(
            msg, INVALID_PARAMS, text, tool=tool, audit_error=f"refused by pinning: {why}", denied="pin"
        )

    def _filter_content_list(self, msg: Message, method: str) -> bytes | None:
        """A resources, templates or prompts list with only what the rules allow (decision 0043),
        re-serialised; None if the result has no such list."""
        member = _CONTENT_LISTS[method]
        result = msg.body.get("result")
        if type(result) is not dict:
            return None
        entries = result.get(member)
        if type(entries) is not list:
            return None
        kept = self._checker.filter_listed(self._app, method, entries)
        if kept is None:  # nothing restricted: the list passes as parsed
            return msg.raw
        key = _KEY_OF[member]
        kept = [e for e in kept if all(k == key or fold_key(k) != key.lower() for k in e)]
        out = {k: v for k, v in result.items() if k == member or fold_key(k) != fold_key(member)}
        out[member] = kept
        return result_response(msg.id, out)

    def _initialize_answered(self, msg: Message, out: list[Command]) -> None:
        if msg.kind == "response":
            result = msg.body.get("result")
            if isinstance(result, dict):
                info = result.get("serverInfo")
                if isinstance(info, dict):
                    self._server_info = _name_version(info)
                version = result.get("protocolVersion")
                if isinstance(version, str):
                    self._protocol_version = clip(version, MAX_NAME)  # the negotiated one
                self._base = None
            self._initialized = True
        self._flush_start(out)

    # ------------------------------------------------------------ audit events

    def _flush_start(self, out: list[Command]) -> None:
        """Record the session start now if it is still waiting (before any other event)."""
        if self._start_pending:
            out.append(RecordAudit(self._start_event()))

    def _start_event(self) -> AuditEvent:
        # Timed when the session began, although recorded later (it waits for
        # server_info), so that it sorts first.
        self._start_pending = False
        return self._event(ev.SESSION_START, True, self._started_at)

    def _base_fields(self) -> dict[str, Any]:
        base = self._base
        if base is None:
            base = dict(_EVENT_TEMPLATE)
            base.update(
                cluster_name=self._cluster_name,
                user=self._identity.username,
                app=self._app_name,
                session_id=self._session_id,
                roles=tuple(self._checker.role_names),
                app_uri=self._app.spec.uri,
                upstream_session_id=self._upstream_session_id,
                client_info=self._client_info,
                server_info=self._server_info,
                protocol_version=self._protocol_version,
                transport=self._transport,
                remote_addr=self._remote_addr,
            )
            self._base = base
        return base

    def _event(
        self,
        type_: str,
        success: bool,
        time: datetime,
        msg: Message | None = None,
        *,
        method: str = "",
        request_id: RequestId = None,
        tool: str = "",
        error: str = "",
        duration_ms: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> AuditEvent:
        values = (self._base or self._base_fields()).copy()
        for name, factory in _FACTORIES:
            values[name] = factory()
        values["id"] = self._new_id()
        if self._headers:
            values["headers"] = self._headers
        values["type"] = type_
        values["time"] = time
        values["success"] = success
        if msg is not None:
            values["method"] = msg.method or ""
            values["request_id"] = msg.id if request_id is None else request_id
            params = msg.body.get("params")  # arrays too: audit what was sent
            if params is not None:
                values["params"] = clip_params(self._redact(params), len(msg.raw))
        else:
            values["method"] = method
            values["request_id"] = request_id
        if tool:
            values["tool"] = tool
        if error:
            values["error"] = error
        if duration_ms is not None:
            values["duration_ms"] = duration_ms
        if extra:
            values["extra"] = extra
        if _FAST_EVENTS:
            event = _new_object(AuditEvent)
            _set_attr(event, "__dict__", values)
            return event
        return AuditEvent(**values)


def _listen_decision(checker: ToolPolicy, app: App, params: dict[str, Any]) -> tuple[Decision | None, str]:
    """Judge the resource URIs a ``subscriptions/listen`` asks about (2026-07-28): the first refused
    one's decision, an allowed one, or (None, why) when they cannot be judged, (None, "") if none."""
    bad = 'subscriptions/listen needs "params.notifications.resourceSubscriptions" to be a list of URIs'
    notifications = params.get("notifications")
    if notifications is None:
        return None, ""
    if type(notifications) is not dict:
        return None, bad
    for key in notifications:  # a folding decoder must not find another list than the one judged
        if key != "resourceSubscriptions" and fold_key(key) == "resourcesubscriptions":
            return None, bad
    uris = notifications.get("resourceSubscriptions")
    if uris is None:
        return None, ""
    if type(uris) is not list or not all(type(u) is str for u in uris):
        return None, bad
    decision: Decision | None = None
    for uri in uris:
        decision = checker.check_resource(app, uri)
        if not decision.allowed:
            return decision, ""
    return decision, ""


def _name_version(info: dict[str, Any]) -> str:
    """``name/version`` of a clientInfo or serverInfo, bounded: it is stored in every event of
    the session, so an unbounded one (a 1 MiB name) made each small call a 1 MiB audit row."""
    name = info.get("name")
    version = info.get("version")
    if not isinstance(name, str) or not name:
        return ""
    return clip(f"{name}/{version}" if isinstance(version, str) and version else name, MAX_NAME)
