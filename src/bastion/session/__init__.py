"""The sans-IO MCP session engine: one client session with one app, as events in and commands out.

:class:`~bastion.session.engine.Session` is told what happened (the client
sent bytes, the upstream sent bytes, the session ended, the policy changed)
and answers with what to do (forward these bytes, send the client those,
record this audit event first).  A runner per transport carries the commands
out in order.  Nothing in this package does I/O, awaits or reads the wall
clock except through the injected clock.
"""

from __future__ import annotations

from bastion.session.engine import (
    CloseSession,
    Command,
    CompleteAudit,
    ForwardToUpstream,
    Log,
    RecordAudit,
    SendToClient,
    Session,
    ToolPolicy,
)

__all__ = [
    "CloseSession",
    "Command",
    "CompleteAudit",
    "ForwardToUpstream",
    "Log",
    "RecordAudit",
    "SendToClient",
    "Session",
    "ToolPolicy",
]
