"""Every client's credentials: loaded together, refused naming its keys, reloaded one by one."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from cryptography.hazmat.primitives import hashes

from proxy.cli import main
from proxy.clients import keyring_for, load_keyring, reload_keyring
from proxy.config import Config, load_config
from proxy.errors import ConfigError, CredentialError, ProxyError
from proxy.sandbox.pki import CertificateAuthority, Issued

CANARY: Final = "canary-Keyring-Pa55-e41d"
DEFAULT_ID: Final = "other:consult:client:confidential"
DAAS_ID: Final = "other:daas:client:confidential"


@dataclass(frozen=True, slots=True)
class Material:
    rsa: Issued
    ec: Issued
    ec_renewed: Issued


@pytest.fixture(scope="module")
def material() -> Material:
    ca = CertificateAuthority("Keyring CA")
    return Material(
        rsa=ca.issue_client("consult"),
        ec=ca.issue_client("daas", key_type="ec"),
        ec_renewed=ca.issue_client("daas renewed", key_type="ec"),
    )


def private(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def setup_files(tmp_path: Path, material: Material) -> None:
    material.rsa.write_pkcs12(tmp_path / "consult.p12", CANARY.encode())
    private(tmp_path / "consult.password", CANARY + "\n")
    material.ec.write_pem(tmp_path / "daas.key", tmp_path / "daas.crt")


def two_clients(tmp_path: Path, daas: str = "", default: str = "") -> Config:
    text = f"""
[client]
id = "{DEFAULT_ID}"
pkcs12 = "consult.p12"
password_file = "consult.password"
{default}
[oauth]
token_url = "https://token.example/t"
[upstream]
url = "https://rest.example"

[[clients]]
name = "daas"
id = "{DAAS_ID}"
private_key = "daas.key"
certificate = "daas.crt"
algorithm = "ES256"
{daas}
[[routes]]
prefix = "/REST/demo/v1"
[[routes]]
prefix = "/REST/daas/v1"
client = "daas"
"""
    path = tmp_path / "ksz-proxy.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, {})


def test_every_client_has_its_credentials(tmp_path: Path, material: Material) -> None:
    setup_files(tmp_path, material)
    keyring = load_keyring(two_clients(tmp_path))
    assert set(keyring) == {"default", "daas"}
    assert keyring["default"].key_type == "rsa"
    assert keyring["default"].sha256 == material.rsa.certificate.fingerprint(hashes.SHA256())
    assert keyring["daas"].key_type == "ec"
    assert keyring["daas"].algorithms == ("ES256",)


def test_a_client_failing_to_load_names_its_own_keys(tmp_path: Path, material: Material) -> None:
    setup_files(tmp_path, material)
    # The daas key with a password it does not have: its keys are named, never the password.
    material.ec.write_pem(tmp_path / "daas.key", tmp_path / "daas.crt")
    private(tmp_path / "daas.password", CANARY + "\n")
    config = two_clients(tmp_path, daas='password_file = "daas.password"')
    with pytest.raises(CredentialError) as caught:
        load_keyring(config)
    detail = caught.value.detail
    assert detail.startswith("clients[0].private_key: ")
    assert "(clients[0].password_file / clients[0].password_env)" in detail
    assert CANARY not in detail


def test_a_keystore_needing_a_password_names_the_clients_password_keys(
    tmp_path: Path, material: Material
) -> None:
    setup_files(tmp_path, material)
    material.ec.write_pem(tmp_path / "daas.key", tmp_path / "daas.crt", CANARY.encode())
    with pytest.raises(CredentialError) as caught:
        load_keyring(two_clients(tmp_path))
    assert caught.value.detail == (
        f"clients[0].private_key: {tmp_path / 'daas.key'} is encrypted; set "
        "clients[0].password_file or clients[0].password_env"
    )


def test_a_clients_algorithm_must_fit_its_key(tmp_path: Path, material: Material) -> None:
    setup_files(tmp_path, material)
    two_clients(tmp_path)
    # The daas entry sets ES256; the default client's RSA key cannot sign ES256 either.
    text = (
        (tmp_path / "ksz-proxy.toml")
        .read_text()
        .replace("[oauth]\n", '[oauth]\nalgorithm = "ES256"\n')
    )
    (tmp_path / "ksz-proxy.toml").write_text(text)
    config = load_config(tmp_path / "ksz-proxy.toml", {})
    with pytest.raises(ConfigError) as caught:
        load_keyring(config)
    assert caught.value.detail.startswith("oauth.algorithm: ES256 needs an EC P-256 key")
    text = text.replace('algorithm = "ES256"\n', "", 1).replace(
        'algorithm = "ES256"', 'algorithm = "PS256"'
    )
    (tmp_path / "ksz-proxy.toml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_keyring(load_config(tmp_path / "ksz-proxy.toml", {}))
    assert caught.value.detail.startswith("clients[0].algorithm: PS256 needs an RSA key")


def test_the_same_id_and_certificate_in_copied_files_is_refused(
    tmp_path: Path, material: Material
) -> None:
    setup_files(tmp_path, material)
    shutil.copy(tmp_path / "daas.key", tmp_path / "copy.key")
    shutil.copy(tmp_path / "daas.crt", tmp_path / "copy.crt")
    twin = (
        '\n[[clients]]\nname = "daas-copy"\n'
        f'id = "{DAAS_ID}"\nprivate_key = "copy.key"\ncertificate = "copy.crt"\n'
        'algorithm = "ES256"\n'
    )
    path = tmp_path / "ksz-proxy.toml"
    two_clients(tmp_path)
    path.write_text(path.read_text() + twin)
    with pytest.raises(ConfigError) as caught:
        load_keyring(load_config(path, {}))
    assert caught.value.detail.startswith(
        'clients[1].id: client "daas" already has this id with the same certificate'
    )
    # The same certificate under another client-id is fine (KSZ allows the reuse).
    path.write_text(
        path.read_text().replace(
            f'id = "{DAAS_ID}"\nprivate_key = "copy', 'id = "x"\nprivate_key = "copy'
        )
    )
    assert set(load_keyring(load_config(path, {}))) == {"default", "daas", "daas-copy"}


def test_keyring_for_one_or_several_clients(tmp_path: Path, material: Material) -> None:
    setup_files(tmp_path, material)
    config = two_clients(tmp_path)
    keyring = load_keyring(config)
    assert keyring_for(config, keyring) == keyring
    with pytest.raises(ValueError, match="several clients"):
        keyring_for(config, keyring["default"])
    with pytest.raises(ValueError, match="no credentials for client daas"):
        keyring_for(config, {"default": keyring["default"]})


def test_a_reload_keeps_a_failing_clients_credentials_and_renews_the_others(
    tmp_path: Path, material: Material
) -> None:
    setup_files(tmp_path, material)
    config = two_clients(tmp_path)
    current = load_keyring(config)
    # The default client's keystore now has another password; daas has a renewed certificate.
    material.rsa.write_pkcs12(tmp_path / "consult.p12", b"another-password")
    material.ec_renewed.write_pem(tmp_path / "daas.key", tmp_path / "daas.crt")
    outcome = reload_keyring(config, load_config(tmp_path / "ksz-proxy.toml", {}), current)
    assert not outcome.ok
    assert outcome.changed == {"daas"}
    assert set(outcome.failures) == {"default"}
    assert outcome.failures["default"].startswith("client.pkcs12: wrong password")
    assert CANARY not in outcome.failures["default"]
    assert outcome.keyring["default"] is current["default"]
    assert outcome.keyring["daas"].subject != current["daas"].subject
    assert "daas renewed" in outcome.keyring["daas"].subject


def test_a_reload_may_change_who_a_client_is_and_drop_a_client(
    tmp_path: Path, material: Material
) -> None:
    # The whole file is reloaded (issue 16): a new client-id is taken with the file's credentials
    # (proxy/running.py gives that client a new token provider), a client gone is dropped.
    setup_files(tmp_path, material)
    config = two_clients(tmp_path)
    current = load_keyring(config)
    path = tmp_path / "ksz-proxy.toml"
    path.write_text(path.read_text().replace(DAAS_ID, "other:new:client:confidential"))
    outcome = reload_keyring(config, load_config(path, {}), current)
    assert outcome.changed == {"default", "daas"}
    assert outcome.failures == {}
    assert outcome.clients[1].id == "other:new:client:confidential"
    gone = path.read_text().split("[[clients]]")[0] + '[[routes]]\nprefix = "/REST/demo/v1"\n'
    path.write_text(gone)
    outcome = reload_keyring(config, load_config(path, {}), current)
    assert outcome.failures == {}
    assert [client.name for client in outcome.clients] == ["default"]
    assert set(outcome.keyring) == {"default"}


def test_a_reload_keeps_a_failing_running_client_as_it_runs_and_refuses_a_failing_new_one(
    tmp_path: Path, material: Material
) -> None:
    setup_files(tmp_path, material)
    config = two_clients(tmp_path)
    current = load_keyring(config)
    path = tmp_path / "ksz-proxy.toml"
    # daas gets another id and a broken key: it keeps running as it did, with its id.
    (tmp_path / "daas.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    path.write_text(path.read_text().replace(DAAS_ID, "other:new:client:confidential"))
    outcome = reload_keyring(config, load_config(path, {}), current)
    assert set(outcome.failures) == {"daas"}
    assert outcome.failures["daas"].startswith("clients[0].private_key: ")
    assert outcome.clients[1] is config.clients_by_name["daas"]
    assert outcome.keyring["daas"] is current["daas"]
    assert outcome.changed == {"default"}
    # A client the running proxy does not have yet has nothing to keep: the reload is refused.
    path.write_text(
        path.read_text().split("[[clients]]")[0] + '[[routes]]\nprefix = "/REST/demo/v1"\n'
    )
    running_alone = load_config(path, {})
    fresh = two_clients(tmp_path)  # daas again, its key still broken
    with pytest.raises(ConfigError, match=r"^clients\[0\]\.private_key: "):
        reload_keyring(running_alone, fresh, {"default": current["default"]})


def test_errors_are_proxy_errors_without_secrets(tmp_path: Path, material: Material) -> None:
    setup_files(tmp_path, material)
    private(tmp_path / "consult.password", "wrong-" + CANARY + "\n")
    with pytest.raises(ProxyError) as caught:
        load_keyring(two_clients(tmp_path))
    assert CANARY not in str(caught.value)
    assert CANARY not in repr(caught.value)


def test_run_exits_2_naming_the_key_for_one_identity_twice(
    tmp_path: Path, material: Material, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_files(tmp_path, material)
    shutil.copy(tmp_path / "daas.key", tmp_path / "copy.key")
    shutil.copy(tmp_path / "daas.crt", tmp_path / "copy.crt")
    path = tmp_path / "ksz-proxy.toml"
    two_clients(tmp_path)
    path.write_text(
        path.read_text()
        + '\n[[clients]]\nname = "copy"\n'
        + f'id = "{DAAS_ID}"\nprivate_key = "copy.key"\ncertificate = "copy.crt"\n'
        + 'algorithm = "ES256"\n'
    )
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["run", "-c", str(path)]) == 2
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert 'clients[1].id: client "daas" already has this id with the same certificate' in err
    assert CANARY not in err
