"""Prometheus metrics (one process-wide registry) and optional OpenTelemetry traces.

What this module is for: the metric objects every service increments, the
registry ``bastion.diag`` serves at ``/metrics``, and :func:`maybe_tracer`.
Every name starts with ``bastion_``.  See ``docs/metrics.md`` for the list.

Rules, and their reasons:

* **Bounded labels.**  Label values are app names (operators configure them),
  a fixed set of MCP methods (anything else is ``other``), transports,
  backends and fixed reason/kind words.  Never a user name, a session id, a
  tool name or any other value a client chooses: each distinct value is a
  time series kept for the life of the process.
* **Cheap on the hot path.**  ``.labels(...)`` costs about a microsecond (a
  lock, a tuple, a dict); the data path instead keeps one :class:`AppMetrics`
  per (app, transport) with its children bound in advance, and looks methods
  up in a dict that only ever holds known methods.
* **No I/O, no imports above** ``bastion.errors``: ``bastion._pg`` and the
  backends import this module.

Updates come from the event loop thread; ``prometheus_client`` makes them
thread-safe anyway (a lock per value).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

__all__ = [
    "AUDIT_EXPORTED",
    "AUDIT_EXPORT_BACKLOG",
    "AUDIT_EXPORT_FAILURES",
    "AUDIT_QUEUE_DEPTH",
    "BACKEND_ERRORS",
    "DENIALS",
    "KNOWN_METHODS",
    "MESSAGES",
    "REGISTRY",
    "SESSIONS",
    "SESSIONS_STARTED",
    "UPSTREAM_ERRORS",
    "UPSTREAM_SECONDS",
    "AppMetrics",
    "Tracer",
    "app_metrics",
    "backend_error",
    "maybe_tracer",
    "method_label",
    "register_audit_queue",
    "upstream_error_kind",
]

log = logging.getLogger("bastion.metrics")

# The *_created series double the output and say little for a long-running
# process; this is a process-wide switch of prometheus_client, and bastion is
# the process.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: The one registry: what ``/metrics`` serves.
REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

SESSIONS: Final = Gauge("bastion_mcp_sessions", "Open MCP gateway sessions.", ["app"], registry=REGISTRY)
SESSIONS_STARTED: Final = Counter(
    "bastion_mcp_sessions_started", "MCP gateway sessions started.", ["app"], registry=REGISTRY
)
MESSAGES: Final = Counter(
    "bastion_mcp_messages",
    "JSON-RPC messages through the gateway, by method (a response counts under the method of "
    "the request it answers) and by who sent it (client or upstream).",
    ["app", "method", "direction"],
    registry=REGISTRY,
)
DENIALS: Final = Counter(
    "bastion_mcp_denials",
    "Requests the gateway refused by policy and answered itself (tool: a tools/call of a tool "
    "the user may not call; arguments: one an argument rule refused; resource, prompt: a read, "
    "subscribe, get or completion outside the role's mcp.resources / mcp.prompts; pin: a call "
    "to a tool whose definition changed or waits for approval; rate: a call over a rate limit; app: any "
    "request in a session whose app access was denied).",
    ["app", "reason"],
    registry=REGISTRY,
)
TOOL_DEFINITION_CHANGES: Final = Counter(
    "bastion_mcp_tool_definition_changes",
    "Tool definitions an app served that differ from their pins (decision 0045): each new "
    "fingerprint seen by this process, once.",
    ["app"],
    registry=REGISTRY,
)
UPSTREAM_SECONDS: Final = Histogram(
    "bastion_upstream_request_seconds",
    "Time from forwarding a request to its upstream's answer (HTTP upstreams: to the response "
    "headers; message streams: to the matching response).",
    ["app", "transport"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
UPSTREAM_ERRORS: Final = Counter(
    "bastion_upstream_errors",
    "Upstream failures: timeout (a request got no answer in time), unreachable (no connection, "
    "an upstream that could not be started or opened, a message stream that broke), protocol "
    "(an invalid or broken answer).",
    ["app", "kind"],
    registry=REGISTRY,
)
AUDIT_QUEUE_DEPTH: Final = Gauge(
    "bastion_audit_queue_depth",
    "Audit items queued and not yet taken by the writer.",
    registry=REGISTRY,
)
AUDIT_EXPORT_BACKLOG: Final = Gauge(
    "bastion_audit_export_backlog",
    "Audit events committed and not yet exported, per sink (file, http); 0 where this "
    "process does not export (another one holds the lease).",
    ["sink"],
    registry=REGISTRY,
)
AUDIT_EXPORTED: Final = Counter(
    "bastion_audit_exported",
    "Audit events exported, per sink (an event may be sent again after a restart or with its outcome).",
    ["sink"],
    registry=REGISTRY,
)
AUDIT_EXPORT_FAILURES: Final = Counter(
    "bastion_audit_export_failures",
    "Failed attempts to export a batch of audit events, per sink (each is retried).",
    ["sink"],
    registry=REGISTRY,
)
BACKEND_ERRORS: Final = Counter(
    "bastion_backend_errors",
    "Storage operations that failed (BackendError), by backend and operation.",
    ["backend", "op"],
    registry=REGISTRY,
)

#: MCP methods counted under their own name; anything else is ``other``.
KNOWN_METHODS: Final = frozenset(
    {
        # client -> server requests
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
        # server -> client requests
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
        # notifications, both ways
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/message",
        "notifications/roots/list_changed",
        "notifications/resources/updated",
        "notifications/resources/list_changed",
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/elicitation/complete",
        "notifications/tasks/status",
        # not a method: a response to a request whose method is not known here
        # (the client's answers to server-to-client requests)
        "response",
    }
)
OTHER: Final = "other"

_BACKENDS: Final = frozenset({"sqlite", "postgres"})
_DENIAL_REASONS: Final = ("tool", "arguments", "resource", "prompt", "pin", "rate", "app", "other")
_ERROR_KINDS: Final = ("timeout", "unreachable", "protocol")


def method_label(method: str) -> str:
    """The ``method`` label for a message's method: itself if known, else ``other``."""
    return method if method in KNOWN_METHODS else OTHER


def upstream_error_kind(exc: BaseException) -> str:
    """``timeout``, ``unreachable`` or ``protocol`` for an upstream failure."""
    if isinstance(exc, TimeoutError) or getattr(exc, "http_status", 0) == 504:
        return "timeout"
    if getattr(exc, "code", "") == "upstream_unreachable":
        return "unreachable"
    return "protocol"


class AppMetrics:
    """The data path's metrics for one app, children bound once (see :func:`app_metrics`).

    ``client(method)`` / ``upstream(method)`` count one message; the dicts
    behind them hold known methods only, so a client inventing methods costs
    a dict miss and a set lookup, never memory.
    """

    __slots__ = (
        "_client",
        "_client_other",
        "_denials",
        "_errors",
        "_upstream",
        "_upstream_other",
        "app",
        "definition_changes",
        "latency",
        "open",
        "started",
    )

    def __init__(self, app: str, transport: str) -> None:
        self.app = app
        self.open = SESSIONS.labels(app)
        self.started = SESSIONS_STARTED.labels(app)
        self.latency = UPSTREAM_SECONDS.labels(app, transport)
        self._client: dict[str, Any] = {}
        self._upstream: dict[str, Any] = {}
        self._client_other = MESSAGES.labels(app, OTHER, "client")
        self._upstream_other = MESSAGES.labels(app, OTHER, "upstream")
        self._denials = {r: DENIALS.labels(app, r) for r in _DENIAL_REASONS}
        self._errors = {k: UPSTREAM_ERRORS.labels(app, k) for k in _ERROR_KINDS}
        self.definition_changes = TOOL_DEFINITION_CHANGES.labels(app)

    def session_started(self) -> None:
        self.started.inc()
        self.open.inc()

    def session_ended(self) -> None:
        self.open.dec()

    def client(self, method: str) -> None:
        """One message from the client."""
        child = self._client.get(method)
        if child is None:
            child = self._bind(self._client, method, "client", self._client_other)
        child.inc()

    def upstream(self, method: str) -> None:
        """One message from the upstream (a response: the method of the request it answers;
        ``""``: it did not parse, which also counts as a ``protocol`` error)."""
        child = self._upstream.get(method)
        if child is None:
            if not method:
                self._errors["protocol"].inc()
            child = self._bind(self._upstream, method, "upstream", self._upstream_other)
        child.inc()

    def denied(self, reason: str) -> None:
        """The gateway refused a request by policy: ``tool``, ``arguments``, ``resource``, ``prompt``,
        ``pin``, ``rate``, ``app`` (anything else: ``other``)."""
        self._denials.get(reason, self._denials["other"]).inc()

    def upstream_error(self, kind: str) -> None:
        """An upstream failure: ``timeout``, ``unreachable`` or ``protocol``."""
        self._errors.get(kind, self._errors["protocol"]).inc()

    def _bind(self, cache: dict[str, Any], method: str, direction: str, other: Any) -> Any:
        if method not in KNOWN_METHODS:
            return other  # not cached: the dict stays bounded
        child = MESSAGES.labels(self.app, method, direction)
        cache[method] = child
        return child


_APPS: dict[tuple[str, str], AppMetrics] = {}


def app_metrics(app: str, transport: str) -> AppMetrics:
    """The :class:`AppMetrics` of ``app`` served over ``transport``, made on first use."""
    key = (app, transport)
    found = _APPS.get(key)
    if found is None:
        found = _APPS[key] = AppMetrics(app, transport)
    return found


def backend_error(backend: str, op: str) -> None:
    """Count one failed storage operation (``op`` is a fixed word of the caller's code)."""
    BACKEND_ERRORS.labels(backend if backend in _BACKENDS else OTHER, op).inc()


def register_audit_queue(depth: Callable[[], int]) -> None:
    """Report ``depth()`` (e.g. ``audit_log.queue_depth``) as ``bastion_audit_queue_depth``
    at each scrape; a later call replaces the earlier source."""
    AUDIT_QUEUE_DEPTH.set_function(lambda: float(depth()))


# ------------------------------------------------------------------ tracing


class Tracer(Protocol):
    """What the gateway uses of an OpenTelemetry ``Tracer``."""

    def start_as_current_span(
        self, name: str, *, attributes: dict[str, Any] | None = None
    ) -> AbstractContextManager[Any]: ...


_tracer: Tracer | None = None
_tracer_decided = False


def maybe_tracer() -> Tracer | None:
    """An OpenTelemetry tracer when ``BASTION_OTEL=1`` and the API is installed, else None.

    Decided once per process.  If no tracer provider was set up already (by
    ``opentelemetry-instrument``, for example) and the SDK is installed, one
    is configured here: spans go to the exporter ``OTEL_TRACES_EXPORTER``
    names (``otlp``, the default, needs ``opentelemetry-exporter-otlp``;
    ``console``; ``none``), the rest of the settings from the standard
    ``OTEL_*`` variables.
    """
    global _tracer, _tracer_decided
    if _tracer_decided:
        return _tracer
    _tracer_decided = True
    if os.environ.get("BASTION_OTEL", "") != "1":
        return None
    try:
        trace = importlib.import_module("opentelemetry.trace")
    except ImportError:
        log.warning(
            "BASTION_OTEL=1 but OpenTelemetry is not installed; no traces (pip install 'mcp-bastion[otel]')"
        )
        return None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        _configure_sdk(trace)
    from bastion import __version__

    _tracer = cast(Tracer, trace.get_tracer("bastion", __version__))
    return _tracer


def _configure_sdk(trace: Any) -> None:
    try:
        sdk_trace = importlib.import_module("opentelemetry.sdk.trace")
        export = importlib.import_module("opentelemetry.sdk.trace.export")
        resources = importlib.import_module("opentelemetry.sdk.resources")
    except ImportError:
        log.warning("BASTION_OTEL=1 but opentelemetry-sdk is not installed; spans are not exported")
        return
    provider = sdk_trace.TracerProvider(
        resource=resources.Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "bastion")})
    )
    exporter = _exporter(export)
    if exporter is not None:
        provider.add_span_processor(export.BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _exporter(export: Any) -> Any:
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if wanted == "none":
        return None
    if wanted == "console":
        return export.ConsoleSpanExporter()
    for module in (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    ):
        try:
            return importlib.import_module(module).OTLPSpanExporter()
        except ImportError:
            continue
    log.warning(
        "BASTION_OTEL=1: no OTLP exporter installed (pip install opentelemetry-exporter-otlp); "
        "spans are not exported",
        extra={"exporter": wanted},
    )
    return None
