"""etcd TLS and auth settings: checked at start-up, with errors that name the PAYDISPATCH_ETCD_*
variables to fix (and no others), and a password that never shows. No etcd here: the files
are made in tmp_path and only stat'ed and opened."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from app.errors import ConfigurationError
from app.leadership.etcd import EtcdClient, EtcdSecurity
from app.settings import load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PAYDISPATCH_* variable from the developer's shell or CI leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("PAYDISPATCH_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    """Three readable files standing in for the CA, the client certificate and its key
    (settings check that they exist and can be read, not what is in them)."""
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return files


def config_error(**env: str | Path) -> str:
    """The ConfigurationError message for these PAYDISPATCH_* variables."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(f"PAYDISPATCH_{name}", str(value))
        with pytest.raises(ConfigurationError) as raised:
            load_settings()
    return str(raised.value)


def named_variables(message: str) -> set[str]:
    """The PAYDISPATCH_* variables an error message names."""
    return set(re.findall(r"PAYDISPATCH_[A-Z_]+", message))


def test_without_any_etcd_security_setting_etcd_is_plain_and_anonymous() -> None:
    settings = load_settings()

    assert settings.etcd_ca_file is None
    assert settings.etcd_cert_file is None
    assert settings.etcd_key_file is None
    assert settings.etcd_username is None
    assert settings.etcd_password is None


def test_tls_with_a_client_certificate_and_a_user_is_accepted(
    monkeypatch: pytest.MonkeyPatch, pem: dict[str, Path]
) -> None:
    monkeypatch.setenv("PAYDISPATCH_ETCD_ENDPOINTS", "https://etcd-1:2379,etcd-2:2379")
    monkeypatch.setenv("PAYDISPATCH_ETCD_CA_FILE", str(pem["ca"]))
    monkeypatch.setenv("PAYDISPATCH_ETCD_CERT_FILE", str(pem["cert"]))
    monkeypatch.setenv("PAYDISPATCH_ETCD_KEY_FILE", str(pem["key"]))
    monkeypatch.setenv("PAYDISPATCH_ETCD_USERNAME", "paydispatch")
    monkeypatch.setenv("PAYDISPATCH_ETCD_PASSWORD", "s3cret-pw")

    settings = load_settings()

    assert settings.etcd_ca_file == pem["ca"]
    assert settings.etcd_cert_file == pem["cert"]
    assert settings.etcd_key_file == pem["key"]
    assert settings.etcd_username == "paydispatch"
    assert settings.etcd_password is not None
    assert settings.etcd_password.get_secret_value() == "s3cret-pw"
    assert "s3cret-pw" not in repr(settings)
    assert "s3cret-pw" not in str(settings.model_dump())


def test_empty_variables_mean_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # What compose passes for "${PAYDISPATCH_ETCD_CA_FILE:-}".
    for name in ("CA_FILE", "CERT_FILE", "KEY_FILE", "USERNAME", "PASSWORD"):
        monkeypatch.setenv(f"PAYDISPATCH_ETCD_{name}", "")

    settings = load_settings()

    assert (settings.etcd_ca_file, settings.etcd_username, settings.etcd_password) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize("variable", ["ETCD_CA_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"])
def test_a_missing_file_is_named_with_its_variable(
    tmp_path: Path, pem: dict[str, Path], variable: str
) -> None:
    env: dict[str, str | Path] = {
        "ETCD_CA_FILE": pem["ca"],
        "ETCD_CERT_FILE": pem["cert"],
        "ETCD_KEY_FILE": pem["key"],
    }
    env[variable] = tmp_path / "nowhere" / "missing.pem"

    message = config_error(**env)

    assert f"PAYDISPATCH_{variable}:" in message
    assert f"no such file: {tmp_path / 'nowhere' / 'missing.pem'}" in message


def test_a_directory_is_not_a_certificate_file(tmp_path: Path) -> None:
    message = config_error(ETCD_CA_FILE=tmp_path)

    assert "PAYDISPATCH_ETCD_CA_FILE:" in message
    assert "not a regular file" in message


@pytest.mark.skipif(os.getuid() == 0, reason="root reads every file regardless of its mode")
def test_an_unreadable_file_is_named_with_its_variable(pem: dict[str, Path]) -> None:
    pem["ca"].chmod(0)

    message = config_error(ETCD_CA_FILE=pem["ca"])

    assert "PAYDISPATCH_ETCD_CA_FILE:" in message
    assert "cannot read" in message


def test_a_certificate_without_its_key_is_refused(pem: dict[str, Path]) -> None:
    message = config_error(ETCD_CA_FILE=pem["ca"], ETCD_CERT_FILE=pem["cert"])

    assert "etcd_cert_file and etcd_key_file go together" in message
    assert named_variables(message) == {"PAYDISPATCH_ETCD_CERT_FILE", "PAYDISPATCH_ETCD_KEY_FILE"}


def test_a_key_without_its_certificate_is_refused(pem: dict[str, Path]) -> None:
    message = config_error(ETCD_CA_FILE=pem["ca"], ETCD_KEY_FILE=pem["key"])

    assert named_variables(message) == {"PAYDISPATCH_ETCD_CERT_FILE", "PAYDISPATCH_ETCD_KEY_FILE"}


def test_a_client_certificate_without_a_ca_is_refused(pem: dict[str, Path]) -> None:
    message = config_error(ETCD_CERT_FILE=pem["cert"], ETCD_KEY_FILE=pem["key"])

    assert "etcd_cert_file needs etcd_ca_file" in message
    assert named_variables(message) == {"PAYDISPATCH_ETCD_CERT_FILE", "PAYDISPATCH_ETCD_CA_FILE"}


@pytest.mark.parametrize(
    "env",
    [{"ETCD_USERNAME": "paydispatch"}, {"ETCD_PASSWORD": "hunter2-secret"}],
    ids=["user", "password"],
)
def test_a_user_without_a_password_or_the_reverse_is_refused(env: dict[str, str]) -> None:
    message = config_error(**env)

    assert "etcd_username and etcd_password go together" in message
    assert named_variables(message) == {"PAYDISPATCH_ETCD_USERNAME", "PAYDISPATCH_ETCD_PASSWORD"}
    assert "hunter2-secret" not in message


def test_https_endpoints_without_a_ca_are_refused() -> None:
    message = config_error(ETCD_ENDPOINTS="https://etcd-1:2379,https://etcd-2:2379")

    assert "etcd_endpoints use https:// but etcd_ca_file is not set" in message
    assert named_variables(message) == {"PAYDISPATCH_ETCD_ENDPOINTS", "PAYDISPATCH_ETCD_CA_FILE"}


def test_plain_http_endpoints_with_tls_on_are_refused(pem: dict[str, Path]) -> None:
    message = config_error(ETCD_ENDPOINTS="http://etcd-1:2379", ETCD_CA_FILE=pem["ca"])

    assert "plain http://" in message
    assert named_variables(message) == {"PAYDISPATCH_ETCD_ENDPOINTS", "PAYDISPATCH_ETCD_CA_FILE"}


# --- the same rules where the client is built (tests and tools build it directly) -----------


def test_the_security_object_refuses_half_pairs_and_a_certificate_without_tls(
    pem: dict[str, Path],
) -> None:
    with pytest.raises(ConfigurationError, match="certificate and key go together"):
        EtcdSecurity(ca_file=pem["ca"], cert_file=pem["cert"])
    with pytest.raises(ConfigurationError, match="needs TLS"):
        EtcdSecurity(cert_file=pem["cert"], key_file=pem["key"])
    with pytest.raises(ConfigurationError, match="user name and password go together"):
        EtcdSecurity(username="paydispatch")


def test_the_security_object_never_shows_the_password(pem: dict[str, Path]) -> None:
    security = EtcdSecurity(ca_file=pem["ca"], username="paydispatch", password="s3cret-pw")

    assert "s3cret-pw" not in repr(security)
    assert security.tls
    assert security.authenticates


def test_the_client_refuses_https_endpoints_without_a_ca() -> None:
    with pytest.raises(ConfigurationError, match="PAYDISPATCH_ETCD_CA_FILE"):
        EtcdClient(["https://127.0.0.1:2379"], timeout=1.0)
    with pytest.raises(ConfigurationError, match="PAYDISPATCH_ETCD_CA_FILE"):
        EtcdClient(
            ["https://127.0.0.1:2379"],
            timeout=1.0,
            security=EtcdSecurity(username="paydispatch", password="pw"),
        )


def test_the_client_refuses_plain_http_endpoints_with_tls_on(pem: dict[str, Path]) -> None:
    with pytest.raises(ConfigurationError, match="plain http://"):
        EtcdClient(
            ["https://127.0.0.1:2379", "http://127.0.0.1:2380"],
            timeout=1.0,
            security=EtcdSecurity(ca_file=pem["ca"]),
        )


def test_the_client_accepts_https_and_bare_endpoints_with_a_ca(pem: dict[str, Path]) -> None:
    client = EtcdClient(
        ["https://etcd-1:2379", "etcd-2:2379", "[::1]:2379"],
        timeout=1.0,
        security=EtcdSecurity(ca_file=pem["ca"]),
    )

    assert client.endpoints == ("https://etcd-1:2379", "etcd-2:2379", "[::1]:2379")
