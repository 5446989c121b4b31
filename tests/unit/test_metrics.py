"""bastion.metrics (bounded labels, counters that move), the engine's metric signals, the diag server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from bastion import _pg, metrics
from bastion.backend.sqlite import _backend_error
from bastion.diag import DiagServer
from bastion.errors import BackendError, ConfigError, UpstreamError
from bastion.metrics import KNOWN_METHODS, REGISTRY, app_metrics, method_label, upstream_error_kind
from bastion.policy import AccessChecker
from bastion.session.engine import RecordAudit
from bastion.transport.http import UpstreamTimeoutError, UpstreamUnreachableError
from tests.unit.session.test_engine import DEV, call, initialized, notif, req, res, role


def value(name: str, **labels: str) -> float:
    """The current value of one sample (0 if it does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- the helpers


def test_method_label_is_bounded() -> None:
    assert method_label("tools/call") == "tools/call"
    assert method_label("notifications/progress") == "notifications/progress"
    assert method_label("response") == "response"
    for odd in ("", "x/y", "tools/call ", "TOOLS/CALL", "a" * 10_000):
        assert method_label(odd) == "other"


def test_messages_count_by_method_and_direction() -> None:
    m = app_metrics("m-app", "stdio")
    assert app_metrics("m-app", "stdio") is m  # bound once
    before = value("bastion_mcp_messages_total", app="m-app", method="tools/call", direction="client")
    for _ in range(3):
        m.client("tools/call")
    m.upstream("tools/call")
    assert (
        value("bastion_mcp_messages_total", app="m-app", method="tools/call", direction="client")
        == before + 3
    )
    assert value("bastion_mcp_messages_total", app="m-app", method="tools/call", direction="upstream") >= 1


def test_unknown_methods_are_other_and_do_not_grow_the_cache() -> None:
    m = app_metrics("m-odd", "http")
    before = value("bastion_mcp_messages_total", app="m-odd", method="other", direction="client")
    for i in range(1000):
        m.client(f"made/up/{i}")
    assert (
        value("bastion_mcp_messages_total", app="m-odd", method="other", direction="client") == before + 1000
    )
    assert len(m._client) == 0
    m.client("ping")
    assert set(m._client) == {"ping"}
    series = {
        s.labels["method"]
        for fam in REGISTRY.collect()
        if fam.name == "bastion_mcp_messages"
        for s in fam.samples
        if s.labels.get("app") == "m-odd"
    }
    assert series <= KNOWN_METHODS | {"other"}


def test_an_upstream_message_that_does_not_parse_is_a_protocol_error() -> None:
    m = app_metrics("m-bad", "stdio")
    m.upstream("")
    m.upstream("")
    assert value("bastion_upstream_errors_total", app="m-bad", kind="protocol") == 2
    assert value("bastion_mcp_messages_total", app="m-bad", method="other", direction="upstream") == 2


def test_sessions_gauge_and_started_counter() -> None:
    m = app_metrics("m-sess", "demo")
    m.session_started()
    m.session_started()
    m.session_ended()
    assert value("bastion_mcp_sessions", app="m-sess") == 1
    assert value("bastion_mcp_sessions_started_total", app="m-sess") == 2


def test_denials_and_errors_fold_unknown_words() -> None:
    m = app_metrics("m-deny", "http")
    m.denied("tool")
    m.denied("app")
    m.denied("whatever")
    assert [value("bastion_mcp_denials_total", app="m-deny", reason=r) for r in ("tool", "app", "other")] == [
        1,
        1,
        1,
    ]
    m.upstream_error("timeout")
    m.upstream_error("nonsense")
    assert value("bastion_upstream_errors_total", app="m-deny", kind="timeout") == 1
    assert value("bastion_upstream_errors_total", app="m-deny", kind="protocol") == 1


def test_latency_histogram() -> None:
    m = app_metrics("m-lat", "http")
    m.latency.observe(0.003)
    assert value("bastion_upstream_request_seconds_count", app="m-lat", transport="http") == 1
    assert value("bastion_upstream_request_seconds_bucket", app="m-lat", transport="http", le="0.005") == 1
    assert value("bastion_upstream_request_seconds_bucket", app="m-lat", transport="http", le="0.0025") == 0


def test_upstream_error_kinds() -> None:
    assert upstream_error_kind(UpstreamTimeoutError("slow")) == "timeout"
    assert upstream_error_kind(TimeoutError()) == "timeout"
    assert upstream_error_kind(UpstreamUnreachableError("refused")) == "unreachable"
    assert upstream_error_kind(UpstreamError("bad response")) == "protocol"


def test_audit_queue_depth_is_read_at_scrape_time() -> None:
    depth = [3]
    metrics.register_audit_queue(lambda: depth[0])
    assert value("bastion_audit_queue_depth") == 3
    depth[0] = 11
    assert value("bastion_audit_queue_depth") == 11


def test_backend_errors_are_counted_where_they_are_made() -> None:
    before = value("bastion_backend_errors_total", backend="sqlite", op="update")
    import sqlite3

    err = _backend_error(Path("/x.db"), "update", sqlite3.OperationalError("disk I/O error"))
    assert isinstance(err, BackendError)
    assert value("bastion_backend_errors_total", backend="sqlite", op="update") == before + 1

    before = value("bastion_backend_errors_total", backend="postgres", op="put")
    dsn = "postgresql://u:secret@db.example:5432/b"
    assert isinstance(_pg.map_error("pg", dsn, "put", ConnectionRefusedError(111, "refused")), BackendError)
    assert isinstance(_pg.map_error("pg", dsn, "put", RuntimeError("odd")), BackendError)
    assert value("bastion_backend_errors_total", backend="postgres", op="put") == before + 2
    metrics.backend_error("etcd", "get")
    assert value("bastion_backend_errors_total", backend="other", op="get") >= 1


def test_created_series_are_off() -> None:
    app_metrics("m-created", "http").started.inc()
    assert not [s for fam in REGISTRY.collect() for s in fam.samples if s.name.endswith("_created")]


# ------------------------------------------------- the engine's metric signals


def test_engine_marks_tool_denials() -> None:
    h = initialized()
    cmds = h.s.client_sent(call(1, "get_secret"))
    audits = [c for c in cmds if isinstance(c, RecordAudit)]
    assert [a.denied for a in audits] == ["tool"]
    # Allowed calls and other refusals carry no mark.
    assert all(not c.denied for c in h.s.client_sent(call(2, "echo")) if isinstance(c, RecordAudit))
    dup = h.s.client_sent(call(2, "echo"))  # id in use: refused, but not by policy
    assert all(not c.denied for c in dup if isinstance(c, RecordAudit))


def test_engine_marks_app_denials() -> None:
    h = initialized(AccessChecker([role("prod", ["*"], env="prod")], {}))
    audits = [c for c in h.s.client_sent(call(1, "echo")) if isinstance(c, RecordAudit)]
    assert audits[-1].denied == "app"


def test_denied_flag_is_not_part_of_equality() -> None:
    h = initialized()
    (audit,) = [c for c in h.s.client_sent(call(1, "get_secret")) if isinstance(c, RecordAudit)]
    assert audit == RecordAudit(audit.event)


def test_engine_last_method() -> None:
    h = initialized(DEV)
    h.s.client_sent(req(5, "tools/list"))
    assert h.s.last_method == "tools/list"
    h.s.client_sent(notif("notifications/cancelled", {"requestId": 99}))
    assert h.s.last_method == "notifications/cancelled"
    h.s.client_sent(res("srv-1", {}))  # the client answering a server-to-client request
    assert h.s.last_method == "response"
    h.s.client_sent(b"{not json")
    assert h.s.last_method == ""
    h.s.upstream_sent(res(5, {"tools": []}))  # a response: the method it answers
    assert h.s.last_method == "tools/list"
    h.s.upstream_sent(notif("notifications/progress", {"progressToken": 1, "progress": 1}))
    assert h.s.last_method == "notifications/progress"
    h.s.upstream_sent(b"[]")
    assert h.s.last_method == ""


# --------------------------------------------------------------- diag server


@asynccontextmanager
async def diag(ready: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[DiagServer]:
    server = DiagServer("127.0.0.1", 0, ready=ready)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_diag_serves_metrics_health_and_readiness(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="bastion.diag")
    app_metrics("diag-app", "http").client("tools/call")
    async with diag() as server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as c:
        assert server.port != 0
        assert any(
            r.getMessage() == "diag listening" and r.__dict__["addr"] == f"http://127.0.0.1:{server.port}"
            for r in caplog.records
        )
        r = await c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'bastion_mcp_messages_total{app="diag-app",direction="client",method="tools/call"}' in r.text
        assert "process_cpu_seconds_total" in r.text
        om = await c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
        assert (await c.get("/healthz")).text == "ok\n"
        assert (await c.get("/readyz")).status_code == 200
        head = await c.head("/metrics")
        assert head.status_code == 200 and head.content == b""
        assert (await c.get("/nope")).status_code == 404
        post = await c.post("/metrics")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


async def test_readyz_follows_the_callable() -> None:
    state: dict[str, object] = {"ready": False}

    async def ready() -> bool:
        if isinstance(state["ready"], Exception):
            raise state["ready"]
        return bool(state["ready"])

    async with diag(ready) as server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as c:
        assert (await c.get("/readyz")).status_code == 503
        state["ready"] = True
        assert (await c.get("/readyz")).status_code == 200
        state["ready"] = BackendError("database is down")
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200  # liveness is not readiness


async def test_busy_port_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as e:
            await DiagServer("127.0.0.1", port).start()
    assert "bastion.diag_addr" in str(e.value) and str(port) in str(e.value)


# -------------------------------------------------------------------- tracing


@pytest.fixture
def fresh_tracer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(metrics, "_tracer", None)
    monkeypatch.setattr(metrics, "_tracer_decided", False)
    yield
    metrics._tracer, metrics._tracer_decided = None, False


def test_no_tracer_unless_asked(fresh_tracer: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_OTEL", raising=False)
    assert metrics.maybe_tracer() is None
    monkeypatch.setenv("BASTION_OTEL", "1")
    assert metrics.maybe_tracer() is None  # decided once per process


def test_tracer_when_asked(fresh_tracer: None, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    monkeypatch.setenv("BASTION_OTEL", "1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    installed: list[object] = []  # the global provider can be set once per process: not in a test
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    tracer = metrics.maybe_tracer()
    assert tracer is not None
    if installed:  # the SDK is installed: a provider exporting to the console was set up
        sdk = pytest.importorskip("opentelemetry.sdk.trace")
        assert isinstance(installed[0], sdk.TracerProvider)
        installed[0].shutdown()  # type: ignore[attr-defined]
    with tracer.start_as_current_span("mcp.post", attributes={"bastion.app": "x"}):
        pass
    assert metrics.maybe_tracer() is tracer
