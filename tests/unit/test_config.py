"""The configuration file: a full file, defaults, path resolution, starters, and errors."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from bastion.config import (
    DEFAULT_DATA_DIR,
    AppConfig,
    Config,
    default_config,
    load_config,
    split_addr,
    validate_config,
)
from bastion.config_template import render_starter
from bastion.errors import ConfigError
from bastion.resources import App, Header

WriteConfig = Callable[[str], Path]


@pytest.fixture
def write(tmp_path: Path) -> WriteConfig:
    """Write dedented YAML to ``<tmp>/etc/bastion.yaml`` and return its path."""

    def _write(text: str) -> Path:
        path = tmp_path / "etc" / "bastion.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return _write


def config_error(write: WriteConfig, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(text))
    return info.value


FULL = """\
    version: v1
    bastion:
      data_dir: /srv/bastion
      cluster_name: example
      log: {severity: debug, format: json, output: /var/log/bastion.log}
    auth_service:
      enabled: true
      listen_addr: 10.0.0.5:3025
      backend: {type: sqlite, path: /srv/db/bastion.db}
      second_factor: "on"
      authentication: {lockout_attempts: 3, lockout_duration: 1h30m, invite_ttl: 2d}
    proxy_service:
      enabled: true
      listen_addr: 0.0.0.0:443
      public_addr: bastion.example.com:443
      tls: {cert_file: /etc/tls/cert.pem, key_file: /etc/tls/key.pem}
    app_service:
      enabled: true
      demo_server: true
      apps:
      - name: everything
        description: The reference server
        labels: {env: dev}
        uri: mcp+https://mcp.example.com/mcp
        insecure_skip_verify: true
        rewrite:
          headers: ["Authorization: Bearer abc", "X-Team: core"]
          jwt_claims: roles
      - name: files
        mcp:
          command: npx
          args: ["-y", "@modelcontextprotocol/server-filesystem", /srv]
          run_as_host_user: mcp
          env: {NODE_ENV: production}
      - name: legacy
        uri: mcp+sse+http://10.0.0.9:8000/sse
      resources:
      - labels: {"*": "*"}
      - labels: {env: [dev, "^stag.*$"]}
    """


class TestValidFiles:
    def test_full_file(self, write: WriteConfig) -> None:
        cfg = load_config(write(FULL))
        assert cfg.version == "v1"
        assert cfg.data_dir == Path("/srv/bastion")
        assert cfg.cluster_name == "example"
        log = cfg.bastion.log
        assert (log.severity, log.format, log.file) == (
            "debug",
            "json",
            Path("/var/log/bastion.log"),
        )
        auth = cfg.auth_service
        assert auth.listen_addr == "10.0.0.5:3025"
        assert cfg.backend_path == Path("/srv/db/bastion.db")
        assert auth.second_factor == "on"
        assert auth.authentication.lockout_attempts == 3
        assert auth.authentication.lockout_duration == timedelta(hours=1, minutes=30)
        assert auth.authentication.invite_ttl == timedelta(days=2)
        proxy = cfg.proxy_service
        assert proxy.effective_public_addr == "bastion.example.com:443"
        assert proxy.tls.provided
        assert proxy.tls.cert_file == Path("/etc/tls/cert.pem")
        apps = cfg.app_service.apps
        assert [a.name for a in apps] == ["everything", "files", "legacy"]
        assert [a.transport for a in apps] == ["http", "stdio", "sse"]
        assert apps[0].rewrite.headers == [
            Header(name="Authorization", value="Bearer abc"),
            Header(name="X-Team", value="core"),
        ]
        assert apps[0].rewrite.jwt_claims == "roles"
        assert apps[1].mcp is not None
        assert apps[1].mcp.env == {"NODE_ENV": "production"}
        assert cfg.app_service.demo_server
        assert cfg.app_service.resources[1].labels == {"env": ["dev", "^stag.*$"]}
        assert cfg.roles == {"auth", "proxy", "app"}
        assert not cfg.is_agent

    def test_config_is_frozen(self, write: WriteConfig) -> None:
        cfg = load_config(write(FULL))
        with pytest.raises(ValueError, match="frozen"):
            cfg.version = "v2"  # type: ignore[misc]

    def test_app_to_resource(self, write: WriteConfig) -> None:
        app = load_config(write(FULL)).app_service.apps[0]
        resource = app.to_app()
        assert isinstance(resource, App)
        assert resource.metadata.name == "everything"
        assert resource.metadata.description == "The reference server"
        assert resource.metadata.labels == {"env": "dev"}
        assert resource.spec.uri == "mcp+https://mcp.example.com/mcp"
        assert resource.spec.insecure_skip_verify
        assert resource.spec.rewrite == app.rewrite
        assert App.model_validate(resource.model_dump()) == resource

    def test_minimal_file_gets_every_default(self, write: WriteConfig) -> None:
        cfg = load_config(write("version: v1\n"))
        assert cfg.data_dir == DEFAULT_DATA_DIR
        host = socket.gethostname().split(".")[0]
        assert cfg.cluster_name in (host, "bastion")  # "bastion" if the host name is unusable
        assert cfg.bastion.join_params.token_name == ""
        assert cfg.bastion.join_params.method == "token"
        assert cfg.bastion.proxy_server == ""
        assert (cfg.bastion.log.severity, cfg.bastion.log.format) == ("info", "text")
        assert cfg.bastion.log.output == "stderr"
        assert cfg.bastion.log.file is None
        auth = cfg.auth_service
        assert auth.enabled
        assert auth.listen_addr == "127.0.0.1:3025"
        assert auth.backend.type == "sqlite"
        assert auth.backend.path is None
        assert cfg.backend_path == DEFAULT_DATA_DIR / "backend.db"
        assert auth.second_factor == "optional"
        assert auth.authentication.lockout_attempts == 5
        assert auth.authentication.lockout_duration == timedelta(minutes=20)
        assert auth.authentication.invite_ttl == timedelta(hours=1)
        proxy = cfg.proxy_service
        assert proxy.enabled
        assert proxy.listen_addr == "127.0.0.1:3080"
        assert proxy.public_addr == ""
        assert proxy.effective_public_addr == "127.0.0.1:3080"
        assert not proxy.tls.provided
        assert cfg.app_service.enabled
        assert not cfg.app_service.demo_server
        assert cfg.app_service.apps == []
        assert cfg.app_service.resources == []
        assert cfg.roles == {"auth", "proxy", "app"}

    def test_empty_cluster_name_is_the_host_name(self, write: WriteConfig) -> None:
        cfg = load_config(write('version: v1\nbastion: {cluster_name: ""}\n'))
        assert cfg.cluster_name
        assert cfg.cluster_name == load_config(write("version: v1\n")).cluster_name

    def test_empty_sections_and_null_values_mean_defaults(self, write: WriteConfig) -> None:
        cfg = load_config(
            write(
                """\
                version: v1
                bastion:
                proxy_service:
                app_service:
                  apps:
                  - name: everything
                    uri: mcp+http://localhost:8000/mcp
                    labels:
                    description:
                  resources:
                """
            )
        )
        assert cfg.data_dir == DEFAULT_DATA_DIR
        assert cfg.app_service.apps[0].description == ""
        assert cfg.app_service.apps[0].labels == {}
        assert cfg.app_service.resources == []

    @pytest.mark.parametrize(("written", "expected"), [("on", "on"), ("off", "off"), ("true", "on")])
    def test_unquoted_on_off_second_factor(self, write: WriteConfig, written: str, expected: str) -> None:
        # YAML 1.1 reads on/off as booleans.
        cfg = load_config(write(f"version: v1\nauth_service: {{second_factor: {written}}}\n"))
        assert cfg.auth_service.second_factor == expected

    def test_unspecified_listen_host_public_addr_is_localhost(self, write: WriteConfig) -> None:
        for listen in ("0.0.0.0:3080", "[::]:3080"):
            cfg = load_config(write(f'version: v1\nproxy_service: {{listen_addr: "{listen}"}}\n'))
            assert cfg.proxy_service.effective_public_addr == "localhost:3080"

    def test_agent_file(self, write: WriteConfig) -> None:
        cfg = load_config(
            write(
                """\
                version: v1
                bastion:
                  join_params: {token_name: /tmp/token, method: token}
                  proxy_server: bastion.example.com:443
                auth_service: {enabled: false}
                proxy_service: {enabled: false}
                app_service:
                  enabled: true
                  apps:
                  - name: everything
                    uri: "mcp+http://localhost:3001/mcp"
                    labels: {env: dev}
                    description:
                """
            )
        )
        assert cfg.is_agent
        assert cfg.roles == {"app"}
        assert cfg.bastion.proxy_server == "bastion.example.com:443"
        assert cfg.bastion.join_params.token_file == Path("/tmp/token")

    def test_json_config(self, write: WriteConfig) -> None:
        cfg = load_config(write('{"version": "v1", "auth_service": {"listen_addr": "[::1]:3025"}}'))
        assert cfg.auth_service.listen_addr == "[::1]:3025"


class TestPaths:
    def test_relative_paths_resolve_against_the_config_directory(
        self, write: WriteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir("/")
        path = write(
            """\
            version: v1
            bastion:
              data_dir: data
              join_params: {token_name: ./secrets/token}
              log: {output: ../logs/bastion.log}
            auth_service:
              backend: {path: db/backend.db}
            proxy_service:
              tls: {cert_file: tls/cert.pem, key_file: ./tls/key.pem}
            """
        )
        etc = tmp_path / "etc"
        cfg = load_config(path)
        assert cfg.data_dir == etc / "data"
        assert cfg.backend_path == etc / "db" / "backend.db"
        assert cfg.proxy_service.tls.cert_file == etc / "tls" / "cert.pem"
        assert cfg.proxy_service.tls.key_file == etc / "tls" / "key.pem"
        assert cfg.bastion.log.file == tmp_path / "logs" / "bastion.log"
        assert cfg.bastion.join_params.token_file == etc / "secrets" / "token"

    def test_config_path_given_relative(
        self, write: WriteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        write("version: v1\nbastion: {data_dir: ./data}\n")
        monkeypatch.chdir(tmp_path)
        cfg = load_config("etc/bastion.yaml")
        assert cfg.data_dir == tmp_path / "etc" / "data"
        assert cfg.data_dir.is_absolute()

    def test_default_backend_path_follows_data_dir(self, write: WriteConfig, tmp_path: Path) -> None:
        cfg = load_config(write("version: v1\nbastion: {data_dir: state}\n"))
        assert cfg.backend_path == tmp_path / "etc" / "state" / "backend.db"

    def test_join_token_literal_or_file(self, write: WriteConfig, tmp_path: Path) -> None:
        agent = """\
            version: v1
            bastion:
              join_params: {token_name: %s}
              proxy_server: proxy.example.com:3080
            auth_service: {enabled: false}
            proxy_service: {enabled: false}
            """
        cfg = load_config(write(agent % "abc123"))
        assert cfg.bastion.join_params.token_file is None
        assert cfg.bastion.join_params.read_token() == "abc123"

        (tmp_path / "etc" / "token").write_text("s3cret\n")
        cfg = load_config(write(agent % "./token"))
        assert cfg.bastion.join_params.read_token() == "s3cret"

        cfg = load_config(write(agent % "./missing"))
        with pytest.raises(ConfigError, match=r"^bastion\.join_params\.token_name: cannot read"):
            cfg.bastion.join_params.read_token()


class TestDefaultConfig:
    def test_single_node(self, tmp_path: Path) -> None:
        cfg = default_config(tmp_path / "data", cluster_name="test")
        assert isinstance(cfg, Config)
        assert cfg.data_dir == tmp_path / "data"
        assert cfg.cluster_name == "test"
        assert cfg.backend_path == tmp_path / "data" / "backend.db"
        assert cfg.roles == {"auth", "proxy", "app"}

    def test_options_and_overrides(self, tmp_path: Path) -> None:
        cfg = default_config(
            tmp_path,
            auth_listen="127.0.0.1:4025",
            proxy_listen="127.0.0.1:4080",
            public_addr="localhost:4080",
            second_factor="off",
            demo_server=True,
            apps=[
                {"name": "a", "uri": "mcp+http://localhost:9/mcp"},
                AppConfig(name="b", mcp={"command": "cat"}),
            ],
            overrides={"auth_service": {"authentication": {"lockout_attempts": 2}}},
        )
        assert cfg.auth_service.listen_addr == "127.0.0.1:4025"
        assert cfg.proxy_service.effective_public_addr == "localhost:4080"
        assert cfg.auth_service.second_factor == "off"
        assert cfg.auth_service.authentication.lockout_attempts == 2
        assert cfg.auth_service.authentication.lockout_duration == timedelta(minutes=20)
        assert [a.name for a in cfg.app_service.apps] == ["a", "b"]
        assert cfg.app_service.demo_server

    def test_checked_like_a_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"^proxy_service\.listen_addr: invalid address"):
            default_config(tmp_path, proxy_listen="localhost")


# ------------------------------------------------------------------ starters

STARTERS = [
    pytest.param({"roles": {"auth", "proxy", "app"}}, id="all"),
    pytest.param({}, id="all-by-default"),
    pytest.param({"roles": {"auth", "proxy"}}, id="auth+proxy"),
    pytest.param({"roles": {"auth"}}, id="auth"),
    pytest.param({"roles": {"auth", "app"}}, id="auth+app"),
    pytest.param({"demo_server": True}, id="demo"),
    pytest.param(
        {
            "apps": [
                ("everything", "mcp+https://mcp.example.com/mcp"),
                ("legacy", "mcp+sse+http://10.0.0.9:8000/sse"),
                ("files", 'npx -y @modelcontextprotocol/server-filesystem "/srv/my dir"'),
            ]
        },
        id="apps",
    ),
    pytest.param(
        {"roles": {"app"}, "proxy_server": "proxy.example.com:443", "join_token": "/tmp/token"},
        id="agent-token-file",
    ),
    pytest.param(
        {
            "roles": {"app"},
            "proxy_server": "[2001:db8::1]:3080",
            "join_token": "abcd123",
            "apps": [("everything", "mcp+http://localhost:3001/mcp")],
        },
        id="agent-with-app",
    ),
]


class TestStarter:
    @pytest.mark.parametrize("kwargs", STARTERS)
    def test_every_starter_loads(self, write: WriteConfig, kwargs: dict[str, object]) -> None:
        args: dict[str, object] = {"cluster_name": "example", "data_dir": "./data"}
        args.update(kwargs)
        text = render_starter(**args)  # type: ignore[arg-type]
        assert text.startswith("# mcp-bastion configuration")
        assert "\n  # " in text  # commented
        cfg = load_config(write(text))
        roles = kwargs.get("roles", {"auth", "proxy", "app"})
        assert cfg.roles == roles
        assert cfg.data_dir == write("version: v1\n").parent / "data"

    def test_single_node_values(self, write: WriteConfig) -> None:
        text = render_starter(
            cluster_name="example",
            data_dir="/srv/bastion",
            proxy_listen="0.0.0.0:3080",
            auth_listen="127.0.0.1:4025",
            demo_server=True,
            apps=[
                ("everything", "mcp+https://mcp.example.com/mcp"),
                ("files", 'npx -y server-filesystem "/srv/my dir"'),
            ],
        )
        cfg = load_config(write(text))
        assert cfg.cluster_name == "example"
        assert cfg.data_dir == Path("/srv/bastion")
        assert cfg.proxy_service.listen_addr == "0.0.0.0:3080"
        assert cfg.auth_service.listen_addr == "127.0.0.1:4025"
        assert cfg.app_service.demo_server
        everything, files = cfg.app_service.apps
        assert everything.uri == "mcp+https://mcp.example.com/mcp"
        assert files.transport == "stdio"
        assert files.mcp is not None
        assert (files.mcp.command, files.mcp.args) == (
            "npx",
            ["-y", "server-filesystem", "/srv/my dir"],
        )
        assert cfg.app_service.resources[0].labels == {"*": ["*"]}
        # The defaults written out are the real defaults.
        assert cfg.auth_service == default_config(Path("/x")).auth_service.model_copy(
            update={"listen_addr": "127.0.0.1:4025"}
        )

    def test_agent_values(self, write: WriteConfig) -> None:
        text = render_starter(
            cluster_name="ignored",
            data_dir="/var/lib/bastion",
            roles={"app"},
            proxy_server="proxy.example.com:443",
            join_token="/tmp/token",
        )
        cfg = load_config(write(text))
        assert cfg.is_agent
        assert not cfg.auth_service.enabled
        assert not cfg.proxy_service.enabled
        assert cfg.bastion.proxy_server == "proxy.example.com:443"
        assert cfg.bastion.join_params.token_name == "/tmp/token"
        assert cfg.app_service.resources == []

    def test_values_are_quoted(self, write: WriteConfig) -> None:
        text = render_starter(cluster_name="example", data_dir='/srv/we"ird: #dir')
        assert load_config(write(text)).data_dir == Path('/srv/we"ird: #dir')

    @pytest.mark.parametrize("roles", [set(), {"ssh"}, {"proxy"}, {"proxy", "app"}])
    def test_bad_roles(self, roles: set[str]) -> None:
        with pytest.raises(ValueError, match="role"):
            render_starter(cluster_name="x", data_dir="d", roles=roles)

    def test_agent_needs_proxy_and_token(self) -> None:
        with pytest.raises(ConfigError, match=r"^bastion\.proxy_server: required"):
            render_starter(cluster_name="x", data_dir="d", roles={"app"}, join_token="t")
        with pytest.raises(ConfigError, match=r"^bastion\.join_params\.token_name: required"):
            render_starter(cluster_name="x", data_dir="d", roles={"app"}, proxy_server="p:1")

    def test_bad_value_is_reported(self) -> None:
        with pytest.raises(ConfigError, match=r"^proxy_service\.listen_addr: "):
            render_starter(cluster_name="x", data_dir="d", proxy_listen="nope")


# -------------------------------------------------------------------- errors


class TestErrors:
    def test_bad_scheme_exact_path(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            """\
            version: v1
            app_service:
              apps:
              - name: ftp
                uri: mcp+ftp://files.example.com
            """,
        )
        assert 'app_service.apps[0].uri: unknown scheme "mcp+ftp" (known: ' in str(e)
        assert e.path == "app_service.apps[0].uri"
        assert e.reason.startswith('unknown scheme "mcp+ftp"')

    def test_unknown_top_level_key(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nssh_service: {enabled: false}\n")
        assert str(e) == "ssh_service: unknown field"
        assert e.path == "ssh_service"

    def test_unknown_nested_key(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nauth_service:\n  authentication: {lockout: 3}\n")
        assert str(e) == "auth_service.authentication.lockout: unknown field"

    def test_unknown_key_in_app(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            """\
            version: v1
            app_service:
              apps:
              - name: a
                uri: mcp+http://h:1/mcp
                mcp: {command: x, argz: []}
            """,
        )
        assert str(e) == "app_service.apps[0].mcp.argz: unknown field"

    def test_wrong_type(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nauth_service: {authentication: {lockout_attempts: many}}\n")
        assert e.path == "auth_service.authentication.lockout_attempts"
        assert "valid integer" in e.reason

    def test_wrong_type_bool(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nproxy_service: {enabled: [true]}\n")
        assert str(e) == "proxy_service.enabled: expected a boolean, got a list"

    def test_bad_literal(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nbastion: {log: {severity: loud}}\n")
        assert e.path == "bastion.log.severity"
        assert "'debug', 'info', 'warn' or 'error'" in e.reason

    def test_bad_duration(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nauth_service: {authentication: {invite_ttl: 1week}}\n")
        assert str(e) == (
            'auth_service.authentication.invite_ttl: invalid duration "1week" '
            "(use forms like 90s, 30m, 12h, 1h30m, 7d)"
        )

    def test_port_zero_listens_anywhere_but_is_no_public_address(self, write: WriteConfig) -> None:
        cfg = load_config(write('version: v1\nproxy_service: {listen_addr: "127.0.0.1:0"}\n'))
        assert cfg.proxy_service.listen_addr == "127.0.0.1:0"
        e = config_error(write, 'version: v1\nproxy_service: {public_addr: "example.com:0"}\n')
        assert e.path == "proxy_service.public_addr"
        assert "port must be a number from 1 to 65535" in e.reason

    @pytest.mark.parametrize(
        ("addr", "reason"),
        [
            ("localhost", "expected host:port"),
            ("localhost:65536", "port must be a number from 0 to 65535"),
            ("localhost:http", "port must be a number from 0 to 65535"),
            (":3080", "missing host"),
            ("::1:3080", "write IPv6 addresses in brackets"),
            ("[::1:3080", "expected [ipv6-address]:port"),
            ("[not-v6]:3080", "is not an IPv6 address"),
            ("300.1.1.1:3080", "bad IPv4 address"),
            ("bad_host!:3080", "bad host name"),
        ],
    )
    def test_bad_address(self, write: WriteConfig, addr: str, reason: str) -> None:
        e = config_error(write, f'version: v1\nproxy_service: {{listen_addr: "{addr}"}}\n')
        assert e.path == "proxy_service.listen_addr"
        assert e.reason.startswith(f'invalid address "{addr}"')
        assert reason in e.reason

    @pytest.mark.parametrize(
        ("addr", "host", "port"),
        [
            ("127.0.0.1:3080", "127.0.0.1", 3080),
            ("[::1]:1", "::1", 1),
            ("[2001:db8::1]:65535", "2001:db8::1", 65535),
            ("proxy.example.com:443", "proxy.example.com", 443),
        ],
    )
    def test_good_address(self, addr: str, host: str, port: int) -> None:
        assert split_addr(addr) == (host, port)

    def test_bad_public_addr_and_proxy_server(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nproxy_service: {public_addr: example.com}\n")
        assert e.path == "proxy_service.public_addr"
        e = config_error(
            write,
            """\
            version: v1
            bastion: {proxy_server: "proxy:99999", join_params: {token_name: t}}
            auth_service: {enabled: false}
            proxy_service: {enabled: false}
            """,
        )
        assert e.path == "bastion.proxy_server"

    def test_duplicate_app_names(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            """\
            version: v1
            app_service:
              apps:
              - {name: x, uri: "mcp+http://a:1/mcp"}
              - {name: x, uri: "mcp+http://b:1/mcp"}
            """,
        )
        assert str(e) == 'app_service.apps[1].name: duplicate app name "x"'

    def test_bad_app_name_and_label(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            """\
            version: v1
            app_service:
              apps:
              - {name: "no spaces", uri: "mcp+http://a:1/mcp", labels: {"bad key": v}}
            """,
        )
        lines = str(e).splitlines()
        assert lines[0].startswith('app_service.apps[0].name: invalid name "no spaces"')
        assert lines[1] == 'app_service.apps[0].labels: invalid label key "bad key"'

    def test_tls_cert_without_key(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nproxy_service: {tls: {cert_file: cert.pem}}\n")
        assert e.path == "proxy_service.tls.key_file"
        assert str(e).startswith("proxy_service.tls.key_file: required when cert_file is set")

    def test_tls_key_without_cert(self, write: WriteConfig) -> None:
        e = config_error(write, 'version: v1\nproxy_service: {tls: {cert_file: "", key_file: k}}\n')
        assert e.path == "proxy_service.tls.cert_file"

    def test_acme_needs_a_directory_and_names(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nproxy_service: {acme: {enabled: true, domains: [a.example]}}\n")
        assert str(e) == "proxy_service.acme.directory_url: required: the https:// URL of the ACME directory"
        e = config_error(
            write, "version: v1\nproxy_service: {acme: {enabled: true, directory_url: 'https://ca/dir'}}\n"
        )
        assert str(e) == "proxy_service.acme.domains: required: the names the certificate is for"

    def test_acme_or_tls_files_not_both(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            "version: v1\nproxy_service:\n  tls: {cert_file: c.pem, key_file: k.pem}\n"
            "  acme: {enabled: true, directory_url: 'https://ca/dir', domains: [a.example]}\n",
        )
        assert str(e) == "proxy_service.acme.enabled: set tls.cert_file/key_file or acme, not both"

    def test_acme(self, write: WriteConfig) -> None:
        cfg = load_config(
            write(
                "version: v1\nproxy_service:\n  acme: {enabled: true, directory_url: 'https://ca/dir',"
                " domains: [a.example, 192.0.2.1], ca_file: ca.pem}\n"
            )
        )
        acme = cfg.proxy_service.acme
        assert acme.http_addr == "0.0.0.0:80" and acme.domains == ["a.example", "192.0.2.1"]
        assert acme.ca_file is not None and acme.ca_file.is_absolute()

    def test_postgres_backend(self, write: WriteConfig) -> None:
        dsn = "postgresql://bastion:pw-s3cret@db.example.com:5432/bastion"
        cfg = load_config(
            write(f"version: v1\nauth_service: {{backend: {{type: postgres, dsn: '{dsn}'}}}}\n")
        )
        backend = cfg.auth_service.backend
        assert backend.type == "postgres"
        assert backend.dsn is not None and backend.dsn.get_secret_value() == dsn
        assert backend.path is None
        # The DSN holds a password: never shown by repr (logs, tracebacks).
        assert "pw-s3cret" not in repr(cfg)

    def test_postgres_needs_dsn(self, write: WriteConfig) -> None:
        for backend in ("{type: postgres}", '{type: postgres, dsn: ""}'):
            e = config_error(write, f"version: v1\nauth_service: {{backend: {backend}}}\n")
            assert e.path == "auth_service.backend.dsn"
            assert str(e).startswith("auth_service.backend.dsn: required when type is postgres")

    def test_postgres_dsn_must_be_a_postgresql_url(self, write: WriteConfig) -> None:
        text = "version: v1\nauth_service: {backend: {type: postgres, dsn: 'host=db password=pw-s3cret'}}\n"
        e = config_error(write, text)
        assert str(e).startswith("auth_service.backend.dsn: must be a URL starting with postgresql://")
        assert "pw-s3cret" not in str(e)

    def test_postgres_rejects_path_and_sqlite_rejects_dsn(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            "version: v1\nauth_service: {backend: {type: postgres, dsn: 'postgresql://h/db', path: x.db}}\n",
        )
        assert str(e) == "auth_service.backend.path: not used by the postgres backend (it uses dsn)"
        e = config_error(
            write, "version: v1\nauth_service: {backend: {dsn: 'postgresql://u:pw-s3cret@h/db'}}\n"
        )
        assert str(e) == "auth_service.backend.dsn: only used by the postgres backend, not sqlite"

    def test_unknown_backend(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nauth_service: {backend: {type: etcd}}\n")
        assert str(e) == 'auth_service.backend.type: unknown backend type "etcd" (known: sqlite, postgres)'

    def test_stdio_app_without_command(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\napp_service:\n  apps:\n  - name: local\n")
        assert str(e) == (
            "app_service.apps[0]: a stdio app needs mcp.command (or an mcp+http(s)/mcp+sse+http(s) uri)"
        )

    def test_stdio_mcp_without_command(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\napp_service:\n  apps:\n  - {name: l, mcp: {args: [x]}}\n")
        assert str(e) == "app_service.apps[0].mcp.command: required field missing"

    def test_bad_header(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            """\
            version: v1
            app_service:
              apps:
              - name: a
                uri: mcp+https://h/mcp
                rewrite: {headers: ["no colon"]}
            """,
        )
        assert str(e) == (
            'app_service.apps[0].rewrite.headers[0]: malformed header "no colon" (expected "Name: value")'
        )

    def test_bad_resource_selector_regex(self, write: WriteConfig) -> None:
        e = config_error(write, 'version: v1\napp_service:\n  resources:\n  - labels: {env: "^(dev$"}\n')
        assert e.path == "app_service.resources[0].labels"
        assert e.reason.startswith('invalid regular expression "^(dev$"')

    def test_empty_resource_selector(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\napp_service:\n  resources:\n  - labels: {}\n")
        assert e.path == "app_service.resources[0].labels"

    def test_malformed_yaml_has_line_and_column(self, write: WriteConfig) -> None:
        path = write("version: v1\nauth_service:\n  enabled: true\n listen_addr: x\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.path == str(path)
        assert str(info.value).startswith(f"{path}: line 4, column 2: ")

    def test_duplicate_yaml_keys_rejected(self, write: WriteConfig) -> None:
        path = write(
            """\
            version: v1
            auth_service:
              enabled: false
              enabled: true
            """
        )
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == (
            f'{path}: line 4, column 3: duplicate key "enabled" (first defined on line 3)'
        )

    def test_list_where_mapping_expected(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nproxy_service:\n  - enabled: true\n")
        assert str(e) == "proxy_service: expected a mapping, got a list"

    def test_mapping_where_list_expected(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\napp_service:\n  apps: {name: a}\n")
        assert str(e) == "app_service.apps: expected a list, got a mapping"

    def test_top_level_not_a_mapping(self, write: WriteConfig) -> None:
        path = write("- version: v1\n")
        with pytest.raises(ConfigError, match="document 1 is a list, expected a mapping"):
            load_config(path)

    def test_missing_version(self, write: WriteConfig) -> None:
        e = config_error(write, "auth_service: {enabled: true}\n")
        assert str(e) == "version: required field missing"

    @pytest.mark.parametrize("version", ["v3", "1", "v2"])
    def test_wrong_version(self, write: WriteConfig, version: str) -> None:
        e = config_error(write, f'version: "{version}"\n')
        assert str(e) == f'version: unsupported version "{version}" (this bastion reads "v1")'

    def test_multiple_documents(self, write: WriteConfig) -> None:
        path = write("version: v1\n---\nversion: v1\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.path == str(path)
        assert "found 2 YAML documents" in str(info.value)

    def test_trailing_empty_document_is_fine(self, write: WriteConfig) -> None:
        assert load_config(write("version: v1\n---\n")).version == "v1"

    def test_empty_file(self, write: WriteConfig) -> None:
        path = write("# nothing here\n")
        with pytest.raises(ConfigError, match="the file is empty"):
            load_config(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.yaml"
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.path == str(path)
        assert str(info.value) == f"{path}: no such file"

    def test_directory(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="is a directory"):
            load_config(tmp_path)

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "latin1.yaml"
        path.write_bytes(b"version: v1\nbastion: {cluster_name: caf\xe9}\n")
        with pytest.raises(ConfigError, match="not UTF-8"):
            load_config(path)

    def test_every_error_reported(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            """\
            version: v1
            bogus: 1
            auth_service:
              listen_addr: nowhere
              authentication: {invite_ttl: soon}
            app_service:
              apps:
              - {name: a, uri: "mcp+ftp://x"}
            """,
        )
        lines = str(e).splitlines()
        assert e.path == lines[0].split(": ", 1)[0]
        assert sorted(line.split(": ", 1)[0] for line in lines) == [
            "app_service.apps[0].uri",
            "auth_service.authentication.invite_ttl",
            "auth_service.listen_addr",
            "bogus",
        ]

    def test_proxy_without_auth(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nauth_service: {enabled: false}\n")
        assert e.path == "proxy_service.enabled"

    def test_no_service_enabled(self, write: WriteConfig) -> None:
        e = config_error(
            write,
            """\
            version: v1
            auth_service: {enabled: false}
            proxy_service: {enabled: false}
            app_service: {enabled: false}
            """,
        )
        assert str(e).startswith("no service is enabled")
        assert e.path == ""

    def test_agent_requirements(self, write: WriteConfig) -> None:
        agent = "version: v1\nauth_service: {enabled: false}\nproxy_service: {enabled: false}\n"
        e = config_error(write, agent)
        assert e.path == "bastion.proxy_server"
        e = config_error(write, agent + "bastion: {proxy_server: 'p.example.com:443'}\n")
        assert e.path == "bastion.join_params.token_name"

    def test_proxy_server_only_for_agents(self, write: WriteConfig) -> None:
        e = config_error(write, "version: v1\nbastion: {proxy_server: 'p.example.com:443'}\n")
        assert e.path == "bastion.proxy_server"

    def test_empty_data_dir(self, write: WriteConfig) -> None:
        e = config_error(write, 'version: v1\nbastion: {data_dir: ""}\n')
        assert str(e) == "bastion.data_dir: must not be empty"

    def test_validate_config_direct(self) -> None:
        with pytest.raises(ConfigError, match=r"^app_service\.apps\[0\]\.uri: unknown scheme"):
            validate_config({"version": "v1", "app_service": {"apps": [{"name": "a", "uri": "x://"}]}})


def test_audit_export(write: WriteConfig) -> None:
    cfg = load_config(
        write(
            """\
            version: v1
            audit:
              export:
                file: {path: /var/log/bastion/audit.jsonl, keep: 3}
                http: {url: "https://siem.example.com/in", format: json, headers: {Authorization: "Bearer x"}}
                hold: 5s
            """
        )
    )
    export = cfg.audit.export
    assert export is not None and export.file is not None and export.http is not None
    assert (export.file.path, export.file.keep, export.file.max_bytes) == (
        Path("/var/log/bastion/audit.jsonl"),
        3,
        100 << 20,
    )
    assert (export.http.format, export.http.headers, export.hold) == (
        "json",
        {"Authorization": "Bearer x"},
        timedelta(seconds=5),
    )
    assert load_config(write("version: v1\n")).audit.export is None
    e = config_error(write, "version: v1\naudit:\n  export:\n    http: {url: 'ftp://x'}\n")
    assert "audit.export.http.url" in str(e) and "http:// or https://" in str(e)
