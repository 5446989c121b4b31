"""While PostgreSQL is unreachable, nothing a client is answered or the node logs names it.

A node on PostgreSQL reached through a TCP relay the test cuts (a real outage: both sides see
the connection go).  A user the proxy has not seen then asks for an MCP app and for the web
API: the answers are 503 and name the component ("the cluster database is unreachable") and
what to do; neither they nor the node's log carry the DSN, its user, password, database or
address (issue 21; before, the body held the database URL).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from tests import pg
from tests.integration.conftest import start_node, stop_node, wait_for_log

pytestmark = pytest.mark.postgres


async def test_an_outage_leaks_no_dsn_to_clients_or_logs(tmp_path: Path) -> None:
    server, dbname, plain = await pg.create_database()
    role = f"bastion_probe_{secrets.token_hex(4)}"
    password = f"pw-{secrets.token_hex(8)}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
        async with pg.TcpProxy.for_dsn(plain) as relay:
            parts = urlsplit(relay.dsn(plain))
            dsn = urlunsplit(parts._replace(netloc=f"{role}:{password}@127.0.0.1:{relay.port}"))
            node = await asyncio.to_thread(
                start_node,
                tmp_path / "node",
                auth_config=f"  backend:\n    type: postgres\n    dsn: {dsn}\n",
                extra_config="app_service:\n  enabled: false\n",
            )
            try:
                await asyncio.to_thread(node.cli, "users", "add", "newcomer", "--roles=mcp-user", local=True)
                signed = await asyncio.to_thread(
                    node.cli, "auth", "sign", "--user=newcomer", "--format=token", local=True
                )
                ca = tmp_path / "ca.pem"
                ca.write_text((await asyncio.to_thread(node.cli, "auth", "export", local=True)).stdout)

                await relay.cut()  # PostgreSQL is unreachable from here on

                tls = ssl.create_default_context(cafile=str(ca))
                auth = {"Authorization": f"Bearer {signed.stdout.strip()}"}
                async with httpx.AsyncClient(verify=tls, timeout=60, headers=auth) as http:
                    base = f"https://{node.addr}"
                    answers = [
                        await http.post(
                            f"{base}/mcp/apps/anything",
                            json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
                            headers={"Accept": "application/json, text/event-stream"},
                        ),
                        await http.get(f"{base}/v1/whoami"),
                        await http.get(f"{base}/readyz"),
                    ]
                leaks = [dsn, role, password, dbname, f":{relay.port}", "postgresql://"]
                for r in answers:
                    assert r.status_code == 503, (r.request.url, r.text)
                    assert "the cluster database is unreachable" in r.text, r.text
                    assert r.headers["x-bastion-error-origin"] == "gateway"
                    for leak in leaks:
                        assert leak not in r.text, (leak, r.text)
                await asyncio.to_thread(
                    wait_for_log, node.log, r"the cluster database: cannot \w+", node.proc, 30.0
                )
            finally:
                await asyncio.to_thread(stop_node, node)
        log = node.log.read_text()
        # The detail is logged, redacted.
        assert "the cluster database: cannot" in log
        for leak in leaks:
            assert leak not in log, leak
    finally:
        await pg.drop_database(server, dbname)
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
