"""The commented starter file that ``bastion configure`` and ``make demo`` write: ``render_starter``.

The text is built line by line, its comments among the keys, and is
validated with ``bastion.config`` before it is returned, so a starter file
always loads.  What it must not do: import anything of the project but
``bastion.config`` and what that imports (``bastion.resources``,
``bastion._time``, ``bastion.errors``), or touch the file system: the
caller writes the text.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Sequence

from bastion._time import format_duration
from bastion.config import (
    ALL_ROLES,
    CONFIG_VERSION,
    DEFAULT_AUTH_LISTEN,
    DEFAULT_PROXY_LISTEN,
    AuthService,
    validate_config,
)
from bastion.resources.codec import load_documents

__all__ = ["render_starter"]


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _render_app(name: str, target: str) -> list[str]:
    lines = [f"  - name: {_q(name)}", f"    description: {_q('')}", "    labels:", "      env: dev"]
    if "://" in target:
        lines.append(f"    uri: {_q(target)}")
    else:
        argv = shlex.split(target)
        if not argv:
            raise ValueError(f'app "{name}": empty command')
        lines += [
            "    # A stdio MCP server: the app service starts this command for each session.",
            "    mcp:",
            f"      command: {_q(argv[0])}",
            "      args: [" + ", ".join(_q(a) for a in argv[1:]) + "]",
            '      # The host user to run the command as ("" = the user running bastion, which',
            "      # bastion start refuses when that is root: name a user; root only if meant).",
            f"      run_as_host_user: {_q('')}",
        ]
    return lines


def render_starter(
    *,
    cluster_name: str,
    data_dir: str,
    proxy_listen: str = DEFAULT_PROXY_LISTEN,
    auth_listen: str = DEFAULT_AUTH_LISTEN,
    roles: Collection[str] = ALL_ROLES,
    demo_server: bool = False,
    proxy_server: str = "",
    join_token: str = "",
    apps: Sequence[tuple[str, str]] = (),
) -> str:
    """A commented starter configuration that ``load_config`` accepts.

    ``roles`` is the set of services to enable (``auth``, ``proxy``, ``app``);
    ``{"app"}`` alone makes an agent's file, which joins through
    ``proxy_server`` with ``join_token`` (a token or the path of a file
    holding it).  Each ``apps`` entry is ``(name, target)``: a target with
    ``://`` is the MCP server's URI (``mcp+https://...``), anything else is a
    command line for a stdio server.  The text is validated before it is
    returned: ``ValueError`` for a role set that cannot run (empty, unknown
    roles, ``proxy`` without ``auth``), ``ConfigError`` for bad values (an
    invalid address, an agent without ``proxy_server`` or ``join_token``...).
    """
    role_set = frozenset(roles)
    unknown = role_set - ALL_ROLES
    if unknown or not role_set:
        raise ValueError(f"roles must be a non-empty subset of auth, proxy, app (got {sorted(role_set)})")
    auth, proxy, app = ("auth" in role_set, "proxy" in role_set, "app" in role_set)
    if proxy and not auth:
        raise ValueError("the proxy role needs the auth role on the same node")
    agent = role_set == {"app"}
    auth_defaults = AuthService()
    authn = auth_defaults.authentication

    names = [r for r in ("auth", "proxy", "app") if r in role_set]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    what = (
        "an agent running the app service"
        if agent
        else f"a node running the {listed} service{'s' if len(names) > 1 else ''}"
    )
    out: list[str] = [
        f"# mcp-bastion configuration: {what}.",
        "#",
        "# Start it with:  bastion start --config <this file>",
        "# Unknown keys are errors.  Durations are written like 90s, 30m, 12h, 1h30m, 7d.",
        "# Relative paths are resolved against the directory of this file.",
        f"version: {CONFIG_VERSION}",
        "",
        "bastion:",
    ]
    if agent:
        out += [
            "  # An agent takes its cluster name from the cluster it joins.",
            f"  # cluster_name: {_q(cluster_name)}",
        ]
    else:
        out += [
            "  # The cluster's name, shown to users and written into certificates.",
            '  # Empty ("") means this host\'s name.',
            f"  cluster_name: {_q(cluster_name)}",
        ]
    out += [
        "  # Where this node keeps its state (keys, certificates, the backend database).",
        f"  data_dir: {_q(data_dir)}",
    ]
    if agent:
        out += [
            "  # How this agent joins the cluster.  token_name is the join token itself or",
            "  # the path of a file holding it (create one on the cluster with",
            "  # `bastion tokens add --type=app`).  Prefer a file readable only by bastion.",
            "  join_params:",
            f"    token_name: {_q(join_token)}",
            "    method: token",
            "  # host:port of the cluster's proxy service; the agent dials out to it.",
            f"  proxy_server: {_q(proxy_server)}",
        ]
    else:
        out += [
            "  # join_params and proxy_server are only for an agent (app_service alone):",
            "  # join_params:",
            '  #   token_name: "/var/lib/bastion/token"',
            "  #   method: token",
            '  # proxy_server: "proxy.example.com:3080"',
        ]
    out += [
        "  # Diagnostics over plain HTTP without authentication: Prometheus /metrics,",
        "  # /healthz and /readyz.  Off when empty; keep it on a private address.",
        '  # diag_addr: "127.0.0.1:3434"',
        "  log:",
        "    # debug | info | warn | error",
        "    severity: info",
        "    # text | json (one object per line)",
        "    format: text",
        "    # stderr | stdout | the path of a file",
        "    output: stderr",
        "",
        "auth_service:",
    ]
    if auth:
        out += [
            "  enabled: true",
            "  # Where the auth service listens (host:port).  The proxy and agents talk to",
            "  # it; users never do, so keep it on a private address.",
            f"  listen_addr: {_q(auth_listen)}",
            "  backend:",
            "    # sqlite: an embedded database file, for one host.  postgres: a PostgreSQL",
            "    # database that several auth services may share; set dsn instead of path:",
            '    #   dsn: "postgresql://bastion:PASSWORD@db.example.com:5432/bastion"',
            "    type: sqlite",
            '    # The database file; "" means <data_dir>/backend.db.',
            '    path: ""',
            "  # Second factor (TOTP) for local users: off | optional | on.",
            f"  second_factor: {auth_defaults.second_factor}",
            "  authentication:",
            "    # Failed logins in a row before an account is locked, and for how long.",
            f"    lockout_attempts: {authn.lockout_attempts}",
            f"    lockout_duration: {format_duration(authn.lockout_duration)}",
            "    # How long an invitation (sign-up link for a new user) stays valid.",
            f"    invite_ttl: {format_duration(authn.invite_ttl)}",
        ]
    else:
        out += ["  # The auth service runs elsewhere in the cluster.", "  enabled: false"]
    out += ["", "proxy_service:"]
    if proxy:
        out += [
            "  enabled: true",
            "  # Where the proxy listens (host:port): users' MCP clients and agents connect here.",
            f"  listen_addr: {_q(proxy_listen)}",
            "  # host:port that clients use to reach the proxy (a DNS name behind a load",
            '  # balancer, for example).  "" means listen_addr.',
            '  public_addr: ""',
            "  # The proxy's TLS certificate.  Set both files or neither; with neither, the",
            "  # proxy is issued a certificate by the cluster's own CA.",
            "  tls:",
            '    cert_file: ""',
            '    key_file: ""',
        ]
    else:
        out += ["  # The proxy service runs elsewhere in the cluster.", "  enabled: false"]
    out += ["", "app_service:"]
    if app:
        out += [
            "  enabled: true",
            "  # Also serve a small built-in demo MCP server (handy for a first try).",
            f"  demo_server: {'true' if demo_server else 'false'}",
            "  # MCP servers this node gives access to.  uri schemes: mcp+http, mcp+https",
            "  # (streamable HTTP), mcp+sse+http, mcp+sse+https (SSE); leave uri out and set",
            "  # mcp.command for a stdio server.  labels are matched by roles' app_labels.",
        ]
        if apps:
            out.append("  apps:")
            for name, target in apps:
                out += _render_app(name, target)
        else:
            out += [
                "  apps: []",
                "  # apps:",
                '  # - name: "everything"',
                '  #   description: "The MCP reference server"',
                "  #   labels:",
                "  #     env: dev",
                '  #   uri: "mcp+https://mcp.example.com/mcp"',
                "  #   # Headers added to every request to the server:",
                "  #   rewrite:",
                '  #     headers: ["Authorization: Bearer <secret>"]',
                "  #   # Paths forwarded besides the uri's own and /.well-known/oauth-* (prefixes):",
                '  #   extra_paths: ["/v2"]',
                "  #   # MCP era of the server: auto (probed), handshake, or 2026-07-28 (also for stdio):",
                '  #   protocol: "auto"',
                "  #   # Pin tool definitions: a changed one is hidden until approved (`bastion mcp pins`):",
                '  #   pinning: "first_use"',
                "  #   # All users' tool calls together (per user: a role's mcp.rate_limits):",
                '  #   rate_limit: {rate: "100/s", burst: 20}',
                '  # - name: "files"',
                "  #   mcp:",
                '  #     command: "npx"',
                '  #     args: ["-y", "@modelcontextprotocol/server-filesystem", "/srv/shared"]',
            ]
        out += [
            "  # Also serve apps created as resources (`bastion create app.yaml`) whose",
            '  # labels match.  Values are "*", a literal or a ^regex$.',
        ]
        if agent:
            out += ["  # resources:", '  # - labels: {"env": "dev"}', "  resources: []"]
        else:
            out += ["  resources:", "  - labels:", '      "*": "*"']
        out += [
            "  # What those apps (created through the API) may do on this host: nothing unless",
            "  # allowed here.  Programs (a directory ending in / allows the programs in it), host",
            "  # users (root only if listed), variables they may set (never LD_*, PYTHON*,",
            "  # NODE_OPTIONS...), and the networks HTTP/SSE apps may reach (loopback, link-local",
            "  # and this gateway's own listeners stay refused unless a CIDR inside them is listed).",
            "  # dynamic_apps:",
            '  #   commands: ["/opt/mcp/launchers/"]',
            '  #   run_as: ["mcp"]',
            '  #   env: ["API_KEY"]',
            '  #   upstream_networks: ["10.20.0.0/16", "*.mcp.example.com"]',
            "  # Limits on every stdio server this host runs (a client past a cap gets HTTP 429).",
            "  # stdio_limits:",
            "  #   per_user: 16",
            "  #   per_app: 64",
            "  #   memory: 4GiB",
            "  #   open_files: 1024",
            "  #   cpu_time: 1h",
        ]
    else:
        out += ["  enabled: false"]
    if not agent:
        out += [
            "",
            "# The audit log (kept where the auth service runs).",
            "# audit:",
            "#   retention: 90d        # prune older events; unset: keep everything",
            "#   export:               # every event, in commit order, at least once",
            "#     file:",
            '#       path: "/var/log/bastion/audit.jsonl"',
            "#       max_bytes: 104857600   # then rotated to .1, .2...",
            "#       keep: 5",
            "#     http:                # a webhook: batches POSTed, retried with backoff",
            '#       url: "https://siem.example.com/ingest"',
            "#       format: jsonl        # or json (an array)",
            '#       headers: {"Authorization": "Bearer ..."}',
        ]
    text = "\n".join(out) + "\n"

    docs = load_documents(text, source="starter configuration")
    validate_config(docs[0])
    return text
