"""Listening sockets and uvicorn start-up, shared by the proxy, the diag listener and ``bastion proxy mcp``.

Sockets are bound before a server starts, so a busy port is a clear error and
port 0 works (the caller reads the real port).  uvicorn exposes no start-up
event, so ``start_uvicorn`` polls its flag with a deadline.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn


def bind_tcp(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A listening, non-blocking TCP socket; ``OSError`` if the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: only then does asyncio set TCP_NODELAY on accepted
    # sockets (without it every small response waited ~40 ms for delayed ACKs).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def start_uvicorn(
    server: uvicorn.Server, sock: socket.socket, *, name: str, deadline: float = 30.0
) -> asyncio.Task[None]:
    """Run ``server`` on ``sock`` in a task; return it once the server accepts connections."""
    task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not server.started:
        if task.done():
            await task
            raise RuntimeError(f"{name} stopped during start-up")
        if loop.time() > end:
            task.cancel()
            raise RuntimeError(f"{name} did not start within {deadline:.0f} s")
        await asyncio.sleep(0.01)  # polling uvicorn's flag, bounded by the deadline
    return task
