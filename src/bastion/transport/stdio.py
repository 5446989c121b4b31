"""The stdio upstream: one child process per client session, newline-delimited JSON-RPC on its pipes.

``spawn_stdio`` starts the app's ``mcp.command`` and returns a
:class:`StdioUpstream` (a :class:`~bastion.transport.MessageStream`).  Rules
followed (MCP stdio transport; Teleport ``stdio.go``):

- stdout carries messages, one per line; we split lines ourselves so a line
  above ``max_message`` is an error instead of unbounded memory.  Blank lines
  are skipped; everything else is handed on unvalidated (the session engine
  parses it).
- stderr is the server's log: read continuously (a full stderr pipe would
  block the server) and logged at INFO with the app name.
- Shutdown: close stdin, SIGINT, wait ``grace``, SIGKILL, reap.  Signals go to
  the child's process group (it is started in its own session), so wrappers
  such as ``npx`` or ``uvx`` do not leave their real server behind.  A server
  that exits on its own is reaped at once, and what it left running in its
  group is not signalled afterwards (its group id could name someone else's
  group by then); closing stdin gives such leftovers EOF.
- The process is started with ``subprocess.Popen`` and its pipes attached to
  the running loop, and reaped through a pidfd, so it works the same on the
  stdlib loop and on uvloop (which cannot switch users itself).

Security decisions:

- **Environment.**  The child does *not* inherit the gateway's environment,
  which holds the gateway's own secrets (database URLs, join tokens, cloud
  credentials).  It gets ``PATH`` and ``LANG`` from the gateway, ``HOME``,
  ``USER`` and ``LOGNAME`` of the user it runs as, plus the app's ``mcp.env``
  (which wins).  Teleport passes its whole environment; we deliberately don't.
- **User.**  ``mcp.run_as_host_user`` names the host user the server runs as
  (uid, primary gid and supplementary groups are switched; the working
  directory becomes that user's home, or ``/``, since the gateway's may be
  unreadable to it).  A gateway running as root refuses to start a server as
  root unless ``run_as_host_user`` says ``root`` explicitly.  A gateway not
  running as root can only run servers as itself.
- **Limits.**  ``rlimits`` (resource, value) pairs are set in the child after the
  user switch and before exec, so the server and everything it starts inherit
  them (``RLIMIT_DATA``, ``RLIMIT_NOFILE``, ``RLIMIT_CPU``...; see
  docs/decisions/0015-stdio-process-limits.md).  A limit is only ever lowered:
  it is capped at the gateway's own hard limit.  Core dumps are always off (a
  core file would hold what the server had in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from bastion.errors import BastionError, HostConfigError, UpstreamError
from bastion.resources import MCPCommand
from bastion.transport import Inbox, UpstreamClosedError

__all__ = ["StdioUpstream", "spawn_stdio"]

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024
#: stderr lines longer than this are logged in pieces.
_MAX_LOG_LINE = 8 * 1024
#: After the process ended, how long its pipes may take to report EOF before we stop reading.
_PIPE_DRAIN = 1.0
#: SIGKILL cannot be ignored; this only bounds a wait on a process stuck in the kernel.
_KILL_WAIT = 5.0
_SEE_LOG = "see the gateway log for its stderr"


class _LineSplitter:
    """Incremental newline splitter with a line-length bound (bytes in, lines out).

    ``strict``: a line longer than ``limit`` raises ``_TooLong`` (stdout: a
    message we refuse).  Otherwise an unfinished line that outgrows ``limit``
    is handed out as it is (stderr: log it in pieces rather than buffer it).
    """

    def __init__(self, limit: int, *, strict: bool = True) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._strict = strict
        # Bytes of _buf already searched for b"\n": a long line arriving in many chunks
        # is scanned once, not once per chunk.
        self._scanned = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Complete lines in ``data`` (without the newline), in order."""
        buf = self._buf
        buf += data
        lines: list[bytes] = []
        start = 0
        pos = self._scanned
        while (nl := buf.find(b"\n", pos)) != -1:
            if self._strict and nl - start > self._limit:
                raise _TooLong
            lines.append(bytes(buf[start:nl]))
            start = pos = nl + 1
        del buf[:start]
        if len(buf) > self._limit:
            if self._strict:
                raise _TooLong
            lines.append(self.take_rest())
        self._scanned = len(buf)
        return lines

    def take_rest(self) -> bytes:
        """Whatever is buffered without a newline (and forget it)."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return rest


def line_for(raw: bytes) -> bytes:
    """The one line (without its newline) written to a stdio server for the JSON message ``raw``.

    ``raw`` must be one line: the session engine forwards canonical JSON, and
    anything else is refused (:class:`ValueError`) rather than let the server
    read two messages where one was judged.  The line separators U+0085,
    U+2028 and U+2029 (which ``str.splitlines`` splits on) can only stand
    inside JSON strings, so they are written as ``\\u`` escapes: the same JSON.
    """
    if b"\n" in raw or b"\r" in raw:
        raise ValueError("refused to write a message with a line break to a stdio MCP server")
    if b"\xe2\x80\xa8" in raw or b"\xe2\x80\xa9" in raw or b"\xc2\x85" in raw:
        return (
            raw.replace(b"\xe2\x80\xa8", b"\\u2028")
            .replace(b"\xe2\x80\xa9", b"\\u2029")
            .replace(b"\xc2\x85", b"\\u0085")
        )
    return raw


class _TooLong(Exception):
    pass


def _environment(cmd: MCPCommand, home: str, user: str) -> dict[str, str]:
    # Deliberately not os.environ: see the module docstring.
    env = {
        "PATH": os.environ.get("PATH") or os.defpath,
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
    }
    env.update(cmd.env)
    return env


def _identity(cmd: MCPCommand, name: str) -> tuple[dict[str, Any], dict[str, str], str]:
    """Popen keyword arguments for the user switch, the environment and a label for logs."""
    euid = os.geteuid()
    wanted = cmd.run_as_host_user
    if not wanted:
        if euid == 0:
            raise HostConfigError(
                f"app {name}: refusing to run a stdio server as root; set mcp.run_as_host_user"
            )
        current = pwd.getpwuid(euid)
        return {}, _environment(cmd, current.pw_dir, current.pw_name), current.pw_name
    try:
        pw = pwd.getpwnam(wanted)
    except KeyError:
        raise HostConfigError(
            f'app {name}: mcp.run_as_host_user "{wanted}" is not a user on this host'
        ) from None
    env = _environment(cmd, pw.pw_dir, pw.pw_name)
    if euid == pw.pw_uid:
        return {}, env, pw.pw_name
    if euid != 0:
        me = pwd.getpwuid(euid).pw_name
        raise HostConfigError(
            f'app {name}: cannot run the stdio server as "{wanted}": the gateway runs as "{me}" '
            "and only root can switch users"
        )
    kwargs: dict[str, Any] = {
        "user": pw.pw_uid,
        "group": pw.pw_gid,
        "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid),
        "cwd": pw.pw_dir if os.path.isdir(pw.pw_dir) else "/",
    }
    return kwargs, env, pw.pw_name


def _limits_setter(rlimits: Sequence[tuple[int, int]]) -> Callable[[], None]:
    """A ``preexec_fn`` setting ``rlimits`` (plus no core dumps), each capped at our hard limit.

    Everything is computed here, in the parent: the child only calls ``setrlimit``
    with ready-made tuples (no imports, no logging, no locks between fork and exec).
    """
    wanted = dict(rlimits)
    wanted[resource.RLIMIT_CORE] = 0
    pairs: list[tuple[int, tuple[int, int]]] = []
    for res, value in wanted.items():
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        pairs.append((res, (value, value)))
    setrlimit = resource.setrlimit

    def apply() -> None:
        for res, values in pairs:
            setrlimit(res, values)

    return apply


async def spawn_stdio(
    cmd: MCPCommand,
    *,
    name: str,
    grace: float = 5.0,
    max_message: int = DEFAULT_MAX_MESSAGE,
    send_timeout: float = 60.0,
    rlimits: Sequence[tuple[int, int]] = (),
    on_close: Callable[[], None] | None = None,
    logger: logging.Logger = logging.getLogger("bastion.upstream.stdio"),  # noqa: B008
) -> StdioUpstream:
    """Start ``cmd`` for app ``name`` and return its message stream.

    ``grace`` is how long ``aclose`` waits after SIGINT before SIGKILL;
    ``max_message`` bounds one stdout line; ``send_timeout`` bounds how long
    ``send`` waits for the server to read its stdin.  Raises ``HostConfigError``
    (the gateway's fault, not the server's) when the user policy refuses (see the
    module docstring), the user is unknown, or the command cannot be executed
    (the message names it).
    ``rlimits`` are ``(resource.RLIMIT_*, value)`` pairs for the child;
    ``on_close`` is called once the server is stopped and reaped (or at once
    when it could not be started).
    """
    try:
        return await _spawn(cmd, name, grace, max_message, send_timeout, rlimits, on_close, logger)
    except BaseException:
        if on_close is not None:
            on_close()
        raise


async def _spawn(
    cmd: MCPCommand,
    name: str,
    grace: float,
    max_message: int,
    send_timeout: float,
    rlimits: Sequence[tuple[int, int]],
    on_close: Callable[[], None] | None,
    logger: logging.Logger,
) -> StdioUpstream:
    kwargs, env, user = _identity(cmd, name)
    cannot = f'app {name}: cannot start stdio server "{cmd.command}"'
    try:
        # Popen, not loop.subprocess_exec: uvloop (what `bastion start` runs on) rejects
        # user=/group=/extra_groups=, and Popen switches users in C between fork and exec,
        # which preexec_fn could not do safely in a threaded process.  It blocks for the
        # fork+exec only, as loop.subprocess_exec does too.
        popen = subprocess.Popen(  # noqa: ASYNC220
            [cmd.command, *cmd.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            bufsize=0,
            close_fds=True,
            # Own session and process group: signals reach the whole tree, and a Ctrl-C
            # on the gateway's terminal does not hit upstream servers behind its back.
            start_new_session=True,
            # Runs after the user switch, before exec (see _limits_setter).
            preexec_fn=_limits_setter(rlimits),
            **kwargs,
        )
    except FileNotFoundError:
        raise HostConfigError(f"{cannot}: command not found") from None
    except PermissionError as e:
        raise HostConfigError(f"{cannot}: not executable ({e.strerror})") from None
    except OSError as e:
        raise HostConfigError(f"{cannot}: {e.strerror or e}") from None
    except ValueError as e:  # a NUL in an argument, "=" in a variable name: the app's definition
        raise HostConfigError(f"{cannot}: {str(e)[:200]}") from None
    try:
        pipes = await _Pipes.connect(popen)
    except BaseException:
        # Could not attach the pipes to the loop (should not happen): undo the start.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        for pipe in (popen.stdin, popen.stdout, popen.stderr):
            if pipe is not None:
                pipe.close()
        await asyncio.to_thread(popen.wait)
        raise
    logger.info(
        "started stdio server",
        extra={"app": name, "pid": popen.pid, "command": cmd.command, "user": user},
    )
    return StdioUpstream(
        popen,
        pipes,
        name=name,
        grace=grace,
        max_message=max_message,
        send_timeout=send_timeout,
        on_close=on_close,
        logger=logger,
    )


class _WritePipe(asyncio.BaseProtocol):
    """Protocol of the stdin pipe: flow control for ``drain`` and the pipe's end."""

    def __init__(self) -> None:
        self._paused = False
        self._lost: Exception | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        # Normalised to OSError, which is what send() maps to UpstreamClosedError.
        self._lost = exc if isinstance(exc, OSError) else BrokenPipeError("stdin closed")
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    @property
    def ready(self) -> bool:
        """Below the high-water mark and not lost: ``drain`` would return at once."""
        return not self._paused and self._lost is None

    async def drain(self) -> None:
        """Return once the transport's buffer is below its high-water mark; raise if the pipe is gone."""
        while self._paused and self._lost is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self._lost is not None:
            raise self._lost


class _Pipes:
    """The child's pipes on the event loop, and an event set once the child is reaped."""

    def __init__(
        self,
        stdin: asyncio.WriteTransport,
        stdin_protocol: _WritePipe,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        readers: tuple[asyncio.ReadTransport, asyncio.ReadTransport],
        exited: asyncio.Event,
    ) -> None:
        self.stdin = stdin
        self.stdin_protocol = stdin_protocol
        self.stdout = stdout
        self.stderr = stderr
        self.readers = readers
        self.exited = exited

    @classmethod
    async def connect(cls, popen: subprocess.Popen[bytes]) -> _Pipes:
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        loop = asyncio.get_running_loop()
        # The transports take the pipes over (non-blocking, closed with the transport).
        stdin, stdin_protocol = await loop.connect_write_pipe(_WritePipe, popen.stdin)
        stdout = asyncio.StreamReader(limit=_READ_CHUNK)
        out_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), popen.stdout
        )
        stderr = asyncio.StreamReader(limit=_READ_CHUNK)
        err_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stderr), popen.stderr
        )
        exited = asyncio.Event()
        _reap_on_exit(popen, loop, exited)
        return cls(stdin, stdin_protocol, stdout, stderr, (out_transport, err_transport), exited)


def _reap_on_exit(
    popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop, exited: asyncio.Event
) -> None:
    """Reap ``popen`` when it exits (setting its ``returncode``), then set ``exited``.

    We reap it ourselves rather than through the loop's child watcher, which
    only knows processes the loop started.  A pidfd (Linux 5.3+) makes the exit
    a readable event on the loop; elsewhere a daemon thread waits, as asyncio's
    own ThreadedChildWatcher does.
    """
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd >= 0:

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            popen.poll()  # a pidfd is readable once the process is a zombie: this reaps it
            exited.set()

        loop.add_reader(pidfd, on_exit)
        return

    def wait() -> None:
        popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(exited.set)

    threading.Thread(target=wait, name=f"stdio-wait:{popen.pid}", daemon=True).start()


class StdioUpstream:
    """A running stdio MCP server (see :class:`~bastion.transport.MessageStream` for the contract).

    Owns the process, its pipes and three tasks (stdout → messages, stderr →
    log, exit → end of the stream).  Built by :func:`spawn_stdio`.
    """

    upstream_session_id: str

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        pipes: _Pipes,
        *,
        name: str,
        grace: float,
        max_message: int,
        send_timeout: float,
        logger: logging.Logger,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.upstream_session_id = ""
        self._on_close = on_close
        self._proc = popen
        self._pipes = pipes
        self._exited = pipes.exited
        self._stdin = pipes.stdin
        self._name = name
        self._grace = grace
        self._max_message = max_message
        self._send_timeout = send_timeout
        self._log = logger
        self._inbox = Inbox()
        self._closer: asyncio.Task[None] | None = None
        # Progress of the stdout reader, for _watch_exit.
        self._stdout_waiting = False
        self._stdout_bytes = 0
        pid = popen.pid
        self._stdout_task = asyncio.create_task(
            self._read_stdout(pipes.stdout), name=f"stdio-stdout:{name}:{pid}"
        )
        self._stderr_task = asyncio.create_task(
            self._read_stderr(pipes.stderr), name=f"stdio-stderr:{name}:{pid}"
        )
        self._exit_task = asyncio.create_task(self._watch_exit(), name=f"stdio-exit:{name}:{pid}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def exit_code(self) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal), else ``None``."""
        return self._proc.returncode

    # ------------------------------------------------------------- messages

    async def send(self, raw: bytes) -> None:
        """Write ``raw`` as one line (:func:`line_for`) to the server's stdin and wait until it drains."""
        try:
            raw = line_for(raw)
        except ValueError as e:
            raise BastionError(str(e)) from None
        if self._closer is not None:
            raise UpstreamClosedError("upstream connection already closed by the gateway")
        if self._proc.returncode is not None or self._stdin.is_closing():
            raise UpstreamClosedError(self._exit_text())
        self._stdin.writelines((raw, b"\n"))
        proto = self._pipes.stdin_protocol
        if proto.ready:
            return  # below the high-water mark: nothing to wait for (the common case; no timer)
        try:
            async with asyncio.timeout(self._send_timeout):
                await proto.drain()
        except TimeoutError:
            raise UpstreamError(f"stdio server did not read its stdin for {self._send_timeout:g}s") from None
        except OSError:  # BrokenPipeError and friends: the server closed its stdin or exited
            raise UpstreamClosedError(self._exit_text()) from None

    async def receive(self) -> bytes:
        """The next stdout line; ``UpstreamClosedError`` (with the exit code) after EOF."""
        return await self._inbox.get()

    def _exit_text(self) -> str:
        code = self._proc.returncode
        if code is None:
            return f"stdio server closed its pipes; {_SEE_LOG}"
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            return f"stdio server exited with code {code} (killed by {sig}); {_SEE_LOG}"
        return f"stdio server exited with code {code}; {_SEE_LOG}"

    async def _read_stdout(self, stdout: asyncio.StreamReader) -> None:
        try:
            await self._frame_stdout(stdout)
        except Exception as e:
            # Never leave receive() waiting on a reader that died.
            self._log.error(
                "stdio stdout reader failed", extra={"app": self._name, "pid": self._proc.pid}, exc_info=e
            )
            self._inbox.close(UpstreamError(f"reading the stdio server's stdout failed: {e}"))

    async def _frame_stdout(self, stdout: asyncio.StreamReader) -> None:
        lines = _LineSplitter(self._max_message)
        try:
            while True:
                self._stdout_waiting = True
                chunk = await stdout.read(_READ_CHUNK)
                self._stdout_waiting = False
                if not chunk:
                    break
                self._stdout_bytes += len(chunk)
                for line in lines.feed(chunk):
                    msg = line.strip()
                    if msg:
                        await self._inbox.put(msg)
            last = lines.take_rest().strip()
            if last:
                # A final message without its newline is still a message.
                await self._inbox.put(last)
        except _TooLong:
            self._inbox.close(UpstreamError(f"upstream sent a message larger than {self._max_message} bytes"))
            self._log.warning(
                "stdio server sent an oversized message; closing",
                extra={"app": self._name, "pid": self._proc.pid, "limit": self._max_message},
            )
            return
        # EOF on stdout: report the exit code if the process ends soon, as it normally does.
        await self._wait_exit(self._grace)
        self._inbox.close(UpstreamClosedError(self._exit_text()))

    async def _watch_exit(self) -> None:
        # The process can end while something it started (e.g. a daemonised helper) keeps
        # stdout open, so EOF would never come.  Report the exit once the stdout reader has
        # sat idle on the pipe for a whole interval.  A reader blocked on a slow consumer is
        # not idle: what the server wrote before exiting is still delivered, all of it.
        await self._exited.wait()
        seen = -1
        while True:
            done, _ = await asyncio.wait((self._stdout_task,), timeout=_PIPE_DRAIN)
            if done:
                return
            if self._stdout_waiting and self._stdout_bytes == seen:
                break
            seen = self._stdout_bytes
        self._inbox.close(UpstreamClosedError(self._exit_text()))

    async def _read_stderr(self, stderr: asyncio.StreamReader) -> None:
        lines = _LineSplitter(_MAX_LOG_LINE, strict=False)
        while chunk := await stderr.read(_READ_CHUNK):
            for line in lines.feed(chunk):
                self._log_stderr(line)
        self._log_stderr(lines.take_rest())

    def _log_stderr(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            self._log.info("stderr: %s", text, extra={"app": self._name, "pid": self._proc.pid})

    # ------------------------------------------------------------- shutdown

    async def aclose(self) -> None:
        """Stop the server (stdin closed, SIGINT, ``grace``, SIGKILL), reap it, stop the readers.

        Idempotent.  The shutdown runs in its own task, so cancelling the caller
        does not leave a half-stopped process behind.
        """
        if self._closer is None:
            self._inbox.close(UpstreamClosedError("upstream connection closed by the gateway"), discard=True)
            self._closer = asyncio.create_task(self._shutdown(), name=f"stdio-close:{self._name}:{self.pid}")
        await asyncio.shield(self._closer)

    async def _shutdown(self) -> None:
        try:
            await self._stop()
        finally:
            if self._on_close is not None:
                self._on_close()

    async def _stop(self) -> None:
        proc = self._proc
        started = time.monotonic()
        self._stdin.close()
        if proc.returncode is None:
            self._signal(signal.SIGINT)
            if not await self._wait_exit(self._grace):
                self._log.warning(
                    "stdio server ignored SIGINT; killing it",
                    extra={"app": self._name, "pid": proc.pid, "grace": self._grace},
                )
                self._signal(signal.SIGKILL)
                if not await self._wait_exit(_KILL_WAIT):
                    self._log.error(
                        "stdio server survived SIGKILL", extra={"app": self._name, "pid": proc.pid}
                    )
        # Let the readers collect the last stdout/stderr bytes, then stop them regardless
        # (a grandchild outside the process group may hold the pipes open).
        readers = (self._stdout_task, self._stderr_task, self._exit_task)
        _, pending = await asyncio.wait(readers, timeout=_PIPE_DRAIN)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*readers, return_exceptions=True)
        # At EOF they are closed already; not when something else still holds the pipes.
        for transport in self._pipes.readers:
            transport.close()
        for r in results:
            if isinstance(r, Exception):
                self._log.error("stdio reader failed", extra={"app": self._name, "pid": proc.pid}, exc_info=r)
        self._log.info(
            "stdio server stopped",
            extra={
                "app": self._name,
                "pid": proc.pid,
                "exit_code": proc.returncode,
                "elapsed": round(time.monotonic() - started, 3),
            },
        )

    async def _wait_exit(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the process to exit (and be reaped); whether it did."""
        try:
            async with asyncio.timeout(seconds):
                await self._exited.wait()
        except TimeoutError:
            return False
        return True

    def _signal(self, sig: signal.Signals) -> None:
        # Only while the child is unreaped (we reap it: returncode is set exactly then): its
        # pid, which is also its process group id, cannot have been reused by anyone else.
        if self._proc.returncode is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            # Not our group after all (should not happen with start_new_session): fall back.
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)
