"""CPU the audit seals (decision 0032) add per call, measured alone: the work each store adds.

The end-to-end figure (``bench/audit_micro.py``, current against a revision without seals) is
the honest one but is a difference of two ~30 µs numbers on a shared host; this times only what
sealing adds, on events shaped like that benchmark's (~900 bytes of JSON), best of ``--repeat``:

- ``sqlite``: ``sqlite_store._seal_items`` + ``Chain.next`` + the seal's hash for one indexing run
  of ``--batch`` calls (each an inserted row with its outcome merged), per call;
- ``postgres``: what ``PostgresAuditStore.write_batch`` adds for a batch of ``--inflight`` events
  and ``--inflight`` completions (items, digests, the seal), per call;
- ``sign``: one seal signature (ECDSA P-256), made at most every 10 s per writer.

    .venv/bin/python bench/audit_chain_micro.py
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from bastion.audit import chain
from bastion.audit import sqlite_store as sqlite_module
from bastion.audit.events import REQUEST, AuditEvent
from bastion.audit.redact import redact_headers
from bastion.audit.store import clean_text, event_row


def _events(n: int) -> list[AuditEvent]:
    sid = secrets.token_hex(16)
    headers = redact_headers(
        {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2025-06-18",
            "mcp-session-id": sid,
            "authorization": "Bearer " + secrets.token_urlsafe(300),
        }
    )
    return [
        AuditEvent(
            id=uuid.uuid4().hex,
            type=REQUEST,
            time=datetime.now(UTC),
            success=True,
            cluster_name="bench-cluster",
            user="bench",
            app="bench-http",
            session_id=sid,
            roles=("mcp-user",),
            app_uri="http://127.0.0.1:38811/mcp",
            upstream_session_id=secrets.token_hex(16),
            method="tools/call",
            request_id=rid,
            tool="echo",
            params={"name": "echo", "arguments": {"message": "hello from wrk"}},
            client_info="bench-client/1.0",
            server_info="bench-upstream/0.1",
            protocol_version="2025-06-18",
            transport="http",
            remote_addr="127.0.0.1",
            headers=headers,
        )
        for rid in range(n)
    ]


def _best(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2048, help="calls per SQLite indexing run")
    ap.add_argument("--inflight", type=int, default=16, help="calls per PostgreSQL write batch")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = chain.signer_of(pem)
    out: dict[str, Any] = {}

    events = _events(args.batch)
    rows = [[*event_row(e), True] for e in events]
    for r in rows:
        r[8] = 0.42
    c = chain.Chain(1)

    def sqlite_run() -> None:
        for _ in range(10):
            seal = c.next(sqlite_module._seal_items(rows, ()), 1)
            seal.hash()

    out["sqlite_us_per_call"] = round(_best(sqlite_run, args.repeat) / (10 * args.batch) * 1e6, 2)

    small = _events(args.inflight)
    completions = [(e.id, True, "", 0.42) for e in small]

    def pg_batch() -> None:
        for _ in range(100):
            prepared = [event_row(e) for e in small]  # the store builds these anyway: subtracted below
            items: list[list[Any]] = [["i", r[0], chain.event_digest(r[9])] for r in prepared]
            for event_id, success, error, duration in completions:
                items.append(["c", clean_text(event_id), bool(success), error, duration])
            seal = c.next(items, 1)
            seal.hash()

    def pg_rows_only() -> None:
        for _ in range(100):
            [event_row(e) for e in small]

    added = _best(pg_batch, args.repeat) - _best(pg_rows_only, args.repeat)
    out["postgres_us_per_call"] = round(added / (100 * args.inflight) * 1e6, 2)

    seal = c.next([], 1)
    out["sign_us"] = round(_best(lambda: [signer(seal.hash()) for _ in range(100)], 5) / 100 * 1e6, 1)
    out["event_json_bytes"] = len(rows[0][9])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
