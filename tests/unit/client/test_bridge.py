"""The stdio bridge of `bastion mcp connect`: pure helpers, and the message handling over a fake gateway."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from bastion.client import profile as profiles
from bastion.client.bridge import (
    EXPIRED_MESSAGE,
    LOGIN_REQUIRED,
    PROXY_UNREACHABLE,
    SERVER_CHANGED,
    Bridge,
    CredentialExpiredError,
    Credentials,
    InitCache,
    ServerIdentity,
    body_says_expired,
    http_error,
    one_line,
    parse_header,
    server_changed_message,
    server_identity,
)
from bastion.client.local_proxy import CredentialSource
from bastion.errors import UpstreamError
from bastion.protocol import jsonrpc
from bastion.protocol.sse import encode_event
from bastion.transport.http import UpstreamUnreachableError

# ------------------------------------------------------------------ pure helpers


def test_parse_header() -> None:
    assert parse_header("X-Team: blue") == ("X-Team", "blue")
    assert parse_header("  X-Team :  blue sky  ") == ("X-Team", "blue sky")
    assert parse_header("X-Empty:") == ("X-Empty", "")
    assert parse_header("X-Url: https://a:b/c") == ("X-Url", "https://a:b/c")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("no colon", "malformed header"),
        (": value", "malformed header"),
        ("bad name: v", "not a valid header name"),
        ("X-A: line\rbreak", "printable ASCII"),
        ("X-A: caf\u00e9", "printable ASCII"),
        ("Authorization: Bearer x", "cannot be overridden"),
        ("mcp-session-id: x", "cannot be overridden"),
        ("Content-Length: 3", "cannot be overridden"),
    ],
)
def test_parse_header_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_header(text)


def test_server_identity() -> None:
    result = {"protocolVersion": "2025-06-18", "serverInfo": {"name": "everything", "version": "2.0.0"}}
    assert server_identity(result) == ServerIdentity("everything", "2.0.0")
    assert server_identity({"serverInfo": {"name": "x"}}) == ServerIdentity("x", "")
    assert server_identity({"serverInfo": {"name": 3, "version": None}}) == ServerIdentity("", "")
    assert server_identity({}) is None
    assert server_identity([]) is None


def test_server_changed_message() -> None:
    msg = server_changed_message("tools", ServerIdentity("srv", "1.0"), ServerIdentity("srv", "2.0"))
    assert msg == "the MCP server behind tools changed (was srv 1.0, now srv 2.0); restart your MCP client"
    assert "was unknown, now srv 2.0" in server_changed_message("a", None, ServerIdentity("srv", "2.0"))


def test_init_cache_compares_name_and_version() -> None:
    cache = InitCache()
    init = jsonrpc.parse_message(b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}')
    cache.start(init)
    cache.accepted({"protocolVersion": "2025-11-25", "serverInfo": {"name": "srv", "version": "1.0"}})
    cache.initialized = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
    assert cache.request is init and cache.protocol_version == "2025-11-25"
    assert cache.server == ServerIdentity("srv", "1.0")
    same = {"protocolVersion": "2025-11-25", "serverInfo": {"name": "srv", "version": "1.0", "title": "T"}}
    assert cache.changed("app", same) is None
    bumped = {"serverInfo": {"name": "srv", "version": "1.1"}}
    assert cache.changed("app", bumped) == server_changed_message(
        "app", ServerIdentity("srv", "1.0"), ServerIdentity("srv", "1.1")
    )
    assert cache.changed("app", {"serverInfo": {"name": "other", "version": "1.0"}}) is not None
    # A new initialize from the client forgets everything cached.
    cache.start(init)
    assert cache.server is None and cache.initialized is None and cache.protocol_version == ""


def test_http_error_keeps_the_gateways_words_and_says_whose_fault() -> None:
    body = orjson.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32050, "message": "no access"}})
    code, msg = http_error("tools", 403, "client", body)
    assert code == -32050
    assert msg == (
        "no access (HTTP 403 from the bastion proxy; "
        "at fault: the request or your access rights (client side))"
    )
    code, msg = http_error("tools", 502, "upstream", b"connection refused")
    assert code == jsonrpc.INTERNAL_ERROR
    assert msg.startswith("connection refused (HTTP 502") and "the MCP server behind tools" in msg
    # The web API's shape: {"error": {"code": "<string>", "message": ...}}.
    web = orjson.dumps({"error": {"code": "not_found", "message": "gone", "origin": "client"}})
    assert http_error("a", 404, "client", web) == (
        jsonrpc.INVALID_REQUEST,
        "gone (HTTP 404 from the bastion proxy; at fault: the request or your access rights (client side))",
    )
    code, msg = http_error("a", 500, "gateway", b"")
    assert code == jsonrpc.INTERNAL_ERROR and msg.startswith("HTTP 500 (") and "the bastion gateway" in msg
    assert "at fault: unknown" in http_error("a", 500, "", b"x")[1]


def test_body_says_expired() -> None:
    expired = {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "your credential expired; ..."},
    }
    assert body_says_expired(orjson.dumps(expired))
    assert body_says_expired(b"Token Expired")
    assert not body_says_expired(orjson.dumps({"error": {"code": -32600, "message": "bad signature"}}))


def test_one_line() -> None:
    compact = b'{"jsonrpc":"2.0","id":1,"result":{}}'
    line, obj = one_line(compact) or (b"", {})
    assert line is compact and obj["id"] == 1
    pretty = b'{\n  "jsonrpc": "2.0",\n  "id": 1,\n  "result": {"text": "a\\nb"}\n}'
    line, obj = one_line(pretty) or (b"", {})
    assert b"\n" not in line and orjson.loads(line) == orjson.loads(pretty)
    assert one_line(b"[1]") is None
    assert one_line(b"not json") is None


def _identity(path: Path, token: str, expires: datetime) -> None:
    prof = profiles.Profile(
        proxy="proxy.test:443",
        user="alice",
        cluster_name="c",
        token=token,
        expires=expires.isoformat(),
        kind="identity",
    )
    profiles.write_private(path, prof.to_yaml())


def test_credentials_follow_the_file_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_HOME", str(tmp_path / "home"))
    path = tmp_path / "alice.id"
    later = datetime.now(UTC) + timedelta(hours=1)
    _identity(path, "t1", later)
    creds = Credentials(CredentialSource(identity=path, proxy=None))
    assert creds.token() == "t1" and creds.proxy == "proxy.test:443" and not creds.expired()
    _identity(path, "t2", later)  # `bastion auth sign --out` again: read on the next request
    assert creds.token() == "t2"
    _identity(path, "t3", datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(CredentialExpiredError) as expired:
        creds.token()
    assert expired.value.message == EXPIRED_MESSAGE and creds.expired()
    assert not creds.renewed("t2")  # expired: not a usable renewal
    _identity(path, "t4", later)
    assert creds.renewed("t3") and not creds.renewed("t4")
    assert creds.token() == "t4"


# ------------------------------------------------------------------ a fake gateway


@dataclass
class Req:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def message(self) -> dict[str, Any]:
        return dict(json.loads(self.body)) if self.body else {}


class FakeResponse:
    """Quacks like UpstreamResponse: status, headers, a body read whole or chunk by chunk."""

    def __init__(
        self,
        status: int = 200,
        *,
        body: bytes = b"",
        chunks: list[bytes | asyncio.Event] | None = None,
        ctype: str = "",
        headers: dict[str, str] | None = None,
        fail: UpstreamError | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.chunks = chunks
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        if ctype:
            self.headers["content-type"] = ctype
        self.fail = fail
        self.closed = False

    def header(self, name: bytes) -> bytes | None:
        v = self.headers.get(name.decode().lower())
        return v.encode() if v is not None else None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip()

    async def read(self, max_size: int = 1 << 30) -> bytes:
        if self.chunks is not None:
            return b"".join([c async for c in self.iter_chunks()])
        return self.body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for c in self.chunks or [self.body]:
            if isinstance(c, asyncio.Event):
                await c.wait()  # the test decides when the stream goes on
            else:
                yield c
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        self.closed = True


def jsonrpc_error(status: int, message: str, origin: str = "client") -> FakeResponse:
    body = orjson.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}})
    return FakeResponse(
        status, body=body, ctype="application/json", headers={"x-bastion-error-origin": origin}
    )


@dataclass
class FakeGateway:
    """The gateway as the bridge sees it: sessions, initialize, echo, errors on demand."""

    sse: bool = False
    server: tuple[str, str] = ("srv", "1.0")
    tokens: set[str] = field(default_factory=lambda: {"t1"})
    expired_tokens: set[str] = field(default_factory=set)
    sessions: set[str] = field(default_factory=set)
    requests: list[Req] = field(default_factory=list)
    get: Callable[[Req], FakeResponse] = field(default=lambda req: FakeResponse(405))
    down: int = 0  # the next N requests fail to connect (-1: all of them)
    lose_next: int = 0  # the next N requests lose their connection before an answer
    handlers: dict[str, Callable[[Req], Any]] = field(default_factory=dict)
    opened: int = 0
    #: Set after every request handled and every message the bridge writes: see until().
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.pool = FakePool(self)

    def posts(self, method: str | None = None) -> list[Req]:
        return [
            r
            for r in self.requests
            if r.method == "POST" and (method is None or r.message.get("method") == method)
        ]

    def answer(self, obj: Any, headers: dict[str, str] | None = None) -> FakeResponse:
        raw = orjson.dumps(obj)
        if self.sse:
            return FakeResponse(chunks=[encode_event(raw)], ctype="text/event-stream", headers=headers)
        return FakeResponse(body=raw, ctype="application/json", headers=headers)

    async def until(self, pred: Callable[[], bool]) -> None:
        """Wait (bounded) until ``pred()`` holds; it is re-checked whenever something happens."""
        async with asyncio.timeout(5):
            while not pred():
                self.changed.clear()
                await self.changed.wait()

    async def handle(self, req: Req) -> FakeResponse:
        try:
            return await self._handle(req)
        finally:
            self.changed.set()

    async def _handle(self, req: Req) -> FakeResponse:
        self.requests.append(req)
        if self.down:
            self.down -= 1 if self.down > 0 else 0
            raise UpstreamUnreachableError(
                "cannot connect to upstream https://proxy.test: Connection refused"
            )
        if self.lose_next:
            self.lose_next -= 1
            raise UpstreamError("upstream closed the connection before answering")
        token = req.headers.get("authorization", "").removeprefix("Bearer ")
        if token in self.expired_tokens:
            return jsonrpc_error(401, "your credential expired; run `bastion login` again")
        if token not in self.tokens:
            return jsonrpc_error(401, "invalid credential")
        sid = req.headers.get("mcp-session-id", "")
        if req.method == "DELETE":
            self.sessions.discard(sid)
            return FakeResponse(200)
        if req.method == "GET":
            return self.get(req) if sid in self.sessions else jsonrpc_error(404, "session not found")
        msg = req.message
        method = msg.get("method")
        if method == "initialize":
            self.opened += 1
            new = f"s{self.opened}"
            self.sessions.add(new)
            name, version = self.server
            result = {
                "protocolVersion": "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": name, "version": version},
            }
            return self.answer({"jsonrpc": "2.0", "id": msg["id"], "result": result}, {"mcp-session-id": new})
        if sid not in self.sessions:
            return jsonrpc_error(404, "session not found (it ended or never existed)")
        if method in self.handlers:
            out = self.handlers[method](req)
            return await out if asyncio.iscoroutine(out) else out
        if "id" not in msg or method is None:
            return FakeResponse(202)
        if method == "tools/call":
            text = msg["params"]["arguments"]["message"]
            result = {"content": [{"type": "text", "text": f"Echo: {text}"}]}
            return self.answer({"jsonrpc": "2.0", "id": msg["id"], "result": result})
        if method == "ping":
            return self.answer({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
        return self.answer({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "no"}})


class FakePool:
    def __init__(self, gw: FakeGateway) -> None:
        self.gw = gw

    async def request(self, method: str, target: str, headers: Any, body: bytes = b"") -> FakeResponse:
        hs = {k.decode().lower(): v.decode() for k, v in headers}
        assert len(hs) == len(headers), "a header was sent twice"
        return await self.gw.handle(Req(method, target, hs, body))


class FakeCreds:
    """The credential: ``login()`` is a new `bastion login`, seen on the next request;
    ``on_disk`` one that lands between a request and its 401 (seen by ``renewed``)."""

    proxy = "proxy.test:443"

    def __init__(self) -> None:
        self.current = "t1"
        self.on_disk = ""
        self.is_expired = False

    def login(self, token: str) -> None:
        self.current, self.is_expired = token, False

    def token(self) -> str:
        if self.is_expired:
            raise CredentialExpiredError(EXPIRED_MESSAGE)
        return self.current

    def renewed(self, sent: str) -> bool:
        if self.on_disk:
            self.login(self.on_disk)
        return self.current != sent and not self.is_expired

    def expired(self) -> bool:
        return self.is_expired


class Client:
    """Drives a Bridge as an MCP client would, collecting what it writes on stdout."""

    def __init__(self, gw: FakeGateway, creds: FakeCreds | None = None, **kw: Any) -> None:
        self.gw = gw
        self.creds = creds or FakeCreds()
        self.out: list[dict[str, Any]] = []
        self.bridge = Bridge("tools", self.creds, lambda: gw.pool, emit=self._emit, **kw)
        self._id = 0

    async def _emit(self, raw: bytes) -> None:
        assert b"\n" not in raw
        self.out.append(orjson.loads(raw))
        self.gw.changed.set()

    async def send(self, obj: Any) -> None:
        await self.bridge.handle_line(orjson.dumps(obj))

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        self._id += 1
        rid = self._id
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        async with asyncio.timeout(5):
            await self.bridge.wait_idle()
        answers = [m for m in self.out if m.get("id") == rid and "method" not in m]
        assert len(answers) == 1, self.out
        return answers[0]

    async def handshake(self) -> dict[str, Any]:
        init = await self.call(
            "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "c"}}
        )
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        # The GET stream is tried next: let it be, so tests start from a settled session.
        gets = sum(1 for r in self.gw.requests if r.method == "GET")
        await self.gw.until(lambda: sum(1 for r in self.gw.requests if r.method == "GET") > gets)
        return init

    async def echo(self, text: str) -> dict[str, Any]:
        return await self.call("tools/call", {"name": "echo", "arguments": {"message": text}})


def text_of(answer: dict[str, Any]) -> str:
    assert "result" in answer, answer
    return str(answer["result"]["content"][0]["text"])


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Records of the bridge's logger (the `bastion` logger may not propagate to caplog)."""
    got: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("bastion.mcp.connect")
    h, old = H(), logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    try:
        yield got
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)


# ------------------------------------------------------------------ message handling


@pytest.mark.parametrize("sse", [False, True])
async def test_initialize_then_calls_carry_session_and_headers(sse: bool) -> None:
    gw = FakeGateway(sse=sse)
    c = Client(gw, headers=[("X-Team", "blue")])
    init = await c.handshake()
    assert init["result"]["serverInfo"] == {"name": "srv", "version": "1.0"}
    assert text_of(await c.echo("hi")) == "Echo: hi"
    first, initialized, call = gw.posts()
    assert first.target == "/mcp/apps/tools"
    assert first.headers["authorization"] == "Bearer t1"
    assert first.headers["accept"] == "application/json, text/event-stream"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-team"] == "blue"
    assert "mcp-session-id" not in first.headers and "mcp-protocol-version" not in first.headers
    for later in (initialized, call):
        assert later.headers["mcp-session-id"] == "s1"
        assert later.headers["mcp-protocol-version"] == "2025-06-18"
        assert later.headers["x-team"] == "blue"
    assert initialized.message["method"] == "notifications/initialized"
    # The GET stream was tried once the session was initialised; 405 = none, not retried.
    assert [r.headers["accept"] for r in gw.requests if r.method == "GET"] == ["text/event-stream"]
    assert c.bridge.cache.server == ServerIdentity("srv", "1.0")
    await c.bridge.aclose()
    assert gw.requests[-1].method == "DELETE" and gw.requests[-1].headers["mcp-session-id"] == "s1"
    assert gw.sessions == set()


async def test_sse_events_pass_as_they_arrive() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gate = asyncio.Event()

    def slow(req: Req) -> FakeResponse:
        rid = req.message["id"]
        progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
        done = {"jsonrpc": "2.0", "id": rid, "result": {"content": []}}
        chunks: list[bytes | asyncio.Event] = [
            encode_event(b"", id="e0", retry=100),  # a priming event: nothing to pass on
            encode_event(orjson.dumps(progress), id="e1"),
            gate,
            encode_event(orjson.dumps(done), id="e2"),
        ]
        return FakeResponse(chunks=chunks, ctype="text/event-stream")

    gw.handlers["tools/call"] = slow
    await c.send({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "slow"}})
    # The first event is out while the stream is still open.
    await gw.until(lambda: bool(c.out) and c.out[-1].get("method") == "notifications/progress")
    assert not any(m.get("id") == 7 for m in c.out)
    gate.set()
    async with asyncio.timeout(5):
        await c.bridge.wait_idle()
    assert c.out[-1] == {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
    await c.bridge.aclose()


async def test_stream_cut_before_the_answer_is_resumed_with_last_event_id() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    gw.handlers["long"] = lambda req: FakeResponse(
        chunks=[encode_event(b"", id="r0", retry=1), encode_event(orjson.dumps(progress), id="r1")],
        ctype="text/event-stream",
    )  # the server closes the connection after r1 (SSE polling), the answer comes later

    def get(req: Req) -> FakeResponse:
        if req.headers.get("last-event-id") != "r1":
            return FakeResponse(405)
        done = {"jsonrpc": "2.0", "id": 9, "result": {"done": True}}
        return FakeResponse(chunks=[encode_event(orjson.dumps(done), id="r2")], ctype="text/event-stream")

    gw.get = get
    await c.send({"jsonrpc": "2.0", "id": 9, "method": "long"})
    async with asyncio.timeout(5):
        await c.bridge.wait_idle()
    assert c.out[-2:] == [progress, {"jsonrpc": "2.0", "id": 9, "result": {"done": True}}]
    resumed = gw.requests[-1]
    assert resumed.method == "GET" and resumed.headers["mcp-session-id"] == "s1"
    await c.bridge.aclose()


@pytest.mark.parametrize("with_ids", [True, False])
async def test_stream_broken_midway(with_ids: bool) -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    gw.handlers["long"] = lambda req: FakeResponse(
        chunks=[encode_event(orjson.dumps(progress), id="p1.1" if with_ids else None, retry=1)],
        ctype="text/event-stream",
        fail=UpstreamError("upstream connection lost while receiving the response body"),
    )
    done = {"jsonrpc": "2.0", "id": 9, "result": {"done": True}}
    gw.get = lambda req: (
        FakeResponse(chunks=[encode_event(orjson.dumps(done), id="p1.2")], ctype="text/event-stream")
        if req.headers.get("last-event-id") == "p1.1"
        else FakeResponse(405)
    )
    await c.send({"jsonrpc": "2.0", "id": 9, "method": "long"})
    async with asyncio.timeout(5):
        await c.bridge.wait_idle()
    if with_ids:  # the gateway keeps the stream's events: the rest comes on a GET
        assert c.out[-2:] == [progress, done]
    else:
        err = c.out[-1]["error"]
        assert err["code"] == PROXY_UNREACHABLE
        assert "lost the answer from tools midway" in err["message"]
        assert "may or may not have been carried out" in err["message"]
    await c.bridge.aclose()


async def test_202_for_a_request_is_an_error_not_a_hang() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gw.handlers["odd"] = lambda req: FakeResponse(202)
    err = (await c.call("odd"))["error"]
    assert err["code"] == jsonrpc.INTERNAL_ERROR and "202" in err["message"]
    await c.bridge.aclose()


async def test_requests_are_concurrent() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gate = asyncio.Event()

    async def blocked(req: Req) -> FakeResponse:
        await gate.wait()
        return gw.answer({"jsonrpc": "2.0", "id": req.message["id"], "result": {"slow": True}})

    gw.handlers["slow"] = blocked
    await c.send({"jsonrpc": "2.0", "id": "a", "method": "slow"})
    await c.send({"jsonrpc": "2.0", "id": "b", "method": "ping"})
    # The ping is answered while the slow call still waits.
    await gw.until(lambda: any(m.get("id") == "b" for m in c.out))
    assert not any(m.get("id") == "a" for m in c.out)
    gate.set()
    async with asyncio.timeout(5):
        await c.bridge.wait_idle()
    assert [m["id"] for m in c.out[-2:]] == ["b", "a"]
    await c.bridge.aclose()


async def test_notifications_and_responses_write_nothing() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    before = list(c.out)
    await c.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3}})
    await c.send({"jsonrpc": "2.0", "id": "srv-1", "result": {"roots": []}})  # answer to a server request
    assert c.out == before
    assert [r.message.get("id") for r in gw.posts()[-2:]] == [None, "srv-1"]
    await c.bridge.aclose()


async def test_invalid_line_gets_a_parse_error() -> None:
    c = Client(FakeGateway())
    await c.bridge.handle_line(b"{not json")
    await c.bridge.handle_line(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]')
    assert c.out[0]["id"] is None and c.out[0]["error"]["code"] == jsonrpc.PARSE_ERROR
    assert c.out[1]["error"]["code"] == jsonrpc.INVALID_REQUEST and "batches" in c.out[1]["error"]["message"]
    assert c.gw.requests == []


async def test_pretty_printed_answer_becomes_one_line() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gw.handlers["pretty"] = lambda req: FakeResponse(
        body=json.dumps({"jsonrpc": "2.0", "id": req.message["id"], "result": {"a": 1}}, indent=2).encode(),
        ctype="application/json",
    )
    assert (await c.call("pretty"))["result"] == {"a": 1}  # Client._emit asserts one line
    await c.bridge.aclose()


# ------------------------------------------------------------------ reconnection


async def test_lost_session_replays_initialize_and_retries_once(logs: list[str]) -> None:
    gw = FakeGateway(sse=True)
    c = Client(gw)
    await c.handshake()
    client_init = gw.posts("initialize")[0].body
    gw.sessions.clear()  # the gateway restarted
    assert text_of(await c.echo("again")) == "Echo: again"
    inits = gw.posts("initialize")
    assert len(inits) == 2 and inits[1].body == client_init  # the client's own request, replayed
    tail = [(r.message.get("method"), r.headers.get("mcp-session-id")) for r in gw.posts()[-4:]]
    assert tail == [
        ("tools/call", "s1"),  # 404
        ("initialize", None),
        ("notifications/initialized", "s2"),
        ("tools/call", "s2"),  # the retry
    ]
    # The replayed initialize's answer is the bridge's business, not the client's.
    assert sum(1 for m in c.out if "serverInfo" in m.get("result", {})) == 1
    assert any("reconnected to tools" in line for line in logs)
    await c.bridge.aclose()


async def test_dropped_connection_reconnects() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gw.lose_next = 1
    assert text_of(await c.echo("x")) == "Echo: x"
    assert len(gw.posts("initialize")) == 2
    await c.bridge.aclose()


async def test_unreachable_proxy_is_an_error_then_recovers() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gw.down = -1
    failed = await c.echo("x")
    assert failed["error"]["code"] == PROXY_UNREACHABLE
    assert "cannot reach the bastion proxy at proxy.test:443 for tools" in failed["error"]["message"]
    assert "Connection refused" in failed["error"]["message"]
    gw.down = 0
    gw.sessions.clear()
    assert text_of(await c.echo("y")) == "Echo: y"
    await c.bridge.aclose()


async def test_changed_server_is_refused_for_good(logs: list[str]) -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gw.sessions.clear()
    gw.server = ("srv", "2.0")
    refused = await c.echo("x")
    want = "the MCP server behind tools changed (was srv 1.0, now srv 2.0); restart your MCP client"
    assert refused["error"] == {"code": SERVER_CHANGED, "message": want}
    await gw.until(lambda: "s2" not in gw.sessions)  # the session opened to compare is ended
    sent = len(gw.requests)
    again = await c.call("ping")
    assert again["error"] == {"code": SERVER_CHANGED, "message": want}
    assert len(gw.requests) == sent  # nothing forwarded any more
    assert any(want in line for line in logs)
    # A new initialize from the client (it restarted its session) starts afresh.
    await c.handshake()
    assert text_of(await c.echo("z")) == "Echo: z"
    await c.bridge.aclose()


# ------------------------------------------------------------------ credentials


async def test_expired_credential_is_answered_then_a_login_fixes_it() -> None:
    gw = FakeGateway()
    creds = FakeCreds()
    c = Client(gw, creds)
    await c.handshake()
    creds.is_expired = True
    sent = len(gw.requests)
    expired = await c.echo("x")
    assert expired["error"] == {"code": LOGIN_REQUIRED, "message": EXPIRED_MESSAGE}
    assert len(gw.requests) == sent  # refused before sending
    gw.tokens.add("t2")
    creds.login("t2")
    assert text_of(await c.echo("y")) == "Echo: y"
    assert gw.posts()[-1].headers["authorization"] == "Bearer t2"
    assert gw.posts()[-1].headers["mcp-session-id"] == "s1"  # the same session carries on
    await c.bridge.aclose()


async def test_expired_and_session_gone_reconnects_after_login() -> None:
    gw = FakeGateway()
    creds = FakeCreds()
    c = Client(gw, creds)
    await c.handshake()
    creds.is_expired = True
    assert (await c.echo("x"))["error"]["code"] == LOGIN_REQUIRED
    gw.sessions.clear()  # idled out meanwhile
    gw.tokens = {"t2"}
    creds.login("t2")
    assert text_of(await c.echo("y")) == "Echo: y"
    assert [r.headers["authorization"] for r in gw.posts("initialize")] == ["Bearer t1", "Bearer t2"]
    await c.bridge.aclose()


async def test_401_saying_expired_is_the_relogin_error() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gw.expired_tokens.add("t1")  # the gateway's clock says so, ours not yet
    assert (await c.echo("x"))["error"] == {"code": LOGIN_REQUIRED, "message": EXPIRED_MESSAGE}
    await c.bridge.aclose()


async def test_401_after_a_new_login_is_sent_again_with_it() -> None:
    gw = FakeGateway()
    creds = FakeCreds()
    c = Client(gw, creds)
    await c.handshake()
    gw.tokens = {"t2"}  # t1 was revoked; the user logged in again
    creds.on_disk = "t2"
    assert text_of(await c.echo("x")) == "Echo: x"
    assert [r.headers["authorization"] for r in gw.posts("tools/call")] == ["Bearer t1", "Bearer t2"]
    await c.bridge.aclose()


async def test_401_refused_credential_names_the_reason() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gw.tokens = set()
    err = (await c.echo("x"))["error"]
    assert err["code"] == LOGIN_REQUIRED
    assert "invalid credential" in err["message"] and "bastion login" in err["message"]
    await c.bridge.aclose()


async def test_gateway_errors_say_whose_fault() -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    gw.handlers["tools/call"] = lambda req: jsonrpc_error(429, "too many MCP sessions", "client")
    gw.handlers["ping"] = lambda req: FakeResponse(
        502, body=b"upstream refused", ctype="text/plain", headers={"x-bastion-error-origin": "upstream"}
    )
    err = (await c.echo("x"))["error"]
    assert err["code"] == -32600
    assert err["message"] == (
        "too many MCP sessions (HTTP 429 from the bastion proxy; "
        "at fault: the request or your access rights (client side))"
    )
    err = (await c.call("ping"))["error"]
    assert err["code"] == jsonrpc.INTERNAL_ERROR
    assert "upstream refused" in err["message"] and "the MCP server behind tools" in err["message"]
    await c.bridge.aclose()


async def test_undeliverable_notification_is_logged_not_answered(logs: list[str]) -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()
    before = list(c.out)
    gw.down = -1
    await c.send({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"})
    assert c.out == before
    assert any(
        line.startswith("WARNING notification notifications/roots/list_changed") and "not delivered" in line
        for line in logs
    )
    await c.bridge.aclose()


async def test_a_bug_is_an_error_answer_not_a_hang(logs: list[str]) -> None:
    gw = FakeGateway()
    c = Client(gw)
    await c.handshake()

    def broken(req: Req) -> FakeResponse:
        raise ValueError("boom")

    gw.handlers["tools/call"] = broken
    err = (await c.echo("x"))["error"]
    assert err["code"] == jsonrpc.INTERNAL_ERROR and "ValueError: boom" in err["message"]
    assert any(line.startswith("ERROR internal error while carrying request") for line in logs)
    assert (await c.call("ping"))["result"] == {}  # and it carries on
    await c.bridge.aclose()


# ------------------------------------------------------------------ the GET stream


async def test_get_stream_relays_server_messages_and_reopens() -> None:
    gw = FakeGateway()
    opened: list[Req] = []

    def get(req: Req) -> FakeResponse:
        opened.append(req)
        if len(opened) > 1:
            return FakeResponse(405)  # the second time: no stream (stop trying)
        note = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        ask = {"jsonrpc": "2.0", "id": "srv-1", "method": "roots/list"}
        chunks: list[bytes | asyncio.Event] = [
            encode_event(orjson.dumps(note), id="g1", retry=1),
            encode_event(orjson.dumps(ask), id="g2"),
        ]
        return FakeResponse(chunks=chunks, ctype="text/event-stream")

    gw.get = get
    c = Client(gw)
    await c.handshake()
    await gw.until(lambda: len(opened) >= 2)  # the stream ended and was reopened
    methods = [m.get("method") for m in c.out]
    assert "notifications/tools/list_changed" in methods and "roots/list" in methods
    assert opened[1].headers["last-event-id"] == "g2"  # resumed where it stopped
    await c.bridge.aclose()


async def test_get_stream_404_marks_the_session_gone() -> None:
    gw = FakeGateway()
    seen: list[Req] = []

    def get(req: Req) -> FakeResponse:
        seen.append(req)
        if len(seen) > 1:
            return FakeResponse(405)
        return jsonrpc_error(404, "session not found")  # the first session's stream only

    gw.get = get
    c = Client(gw)
    await c.handshake()
    sess = c.bridge.session
    assert sess is not None and sess.listener is not None
    async with asyncio.timeout(5):
        await sess.listener  # it ends on the 404, marking the session gone
    assert sess.gone
    assert text_of(await c.echo("x")) == "Echo: x"
    # No failed POST: the next message opened a new session first.
    assert [r.message.get("method") for r in gw.posts()][-3:] == [
        "initialize",
        "notifications/initialized",
        "tools/call",
    ]
    await c.bridge.aclose()
