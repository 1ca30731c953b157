"""Several client identities in one configuration: [client], [[clients]] and a route's client."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final

import pytest

from proxy.cli import main
from proxy.config import ClientConfig, Config, Secret, default_client, load_config
from proxy.errors import ConfigError

# main() points the root logger at the stderr of the moment (capsys's); it is put back.
pytestmark = pytest.mark.usefixtures("keep_logging")

CANARY: Final = "canary-Daas-Pa55phrase-71c0"  # must never show up in an error message

HEAD: Final = """
environment = "acpt"
"""
DEFAULT_ID: Final = "partenaire:federal:service:bus:client:confidential"
DEFAULT: Final = f"""
[client]
id = "{DEFAULT_ID}"
pkcs12 = "acpt.p12"
"""
DAAS: Final = """
[[clients]]
name = "daas"
id = "other:daas:client:confidential"
private_key = "daas.key"
certificate = "daas.crt"
"""
CONSULT: Final = """
[[clients]]
name = "consult"
id = "other:consult:client:confidential"
pkcs12 = "consult.p12"
"""
ROUTE: Final = """
[[routes]]
prefix = "/REST/demo/v1"
"""
DAAS_ROUTE: Final = """
[[routes]]
prefix = "/REST/daas/v1"
client = "daas"
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def load(tmp_path: Path, *parts: str, environ: dict[str, str] | None = None) -> Config:
    """Load a configuration made of TOML ``parts``."""
    path = write(tmp_path / "ksz-proxy.toml", HEAD + "".join(parts), 0o644)
    return load_config(path, environ or {})


def failure(tmp_path: Path, *parts: str, environ: dict[str, str] | None = None) -> str:
    """Load TOML ``parts``, expecting a ConfigError; return its message."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, *parts, environ=environ)
    return caught.value.detail


# --------------------------------------------------------------------------------------------
# Which client a route carries


def test_client_table_alone_is_the_client_named_default(tmp_path: Path) -> None:
    config = load(tmp_path, DEFAULT, ROUTE)
    [client] = config.clients
    assert client.name == "default"
    assert config.client is client
    assert config.routes[0].client == "default"
    assert default_client(config.clients) == "default"


def test_the_only_client_is_the_default_whatever_its_name(tmp_path: Path) -> None:
    config = load(tmp_path, DAAS, ROUTE)
    [daas] = config.clients
    assert daas.name == "daas"
    assert config.client is daas
    assert [r.client for r in config.routes] == ["daas"]


def test_routes_choose_their_client(tmp_path: Path) -> None:
    config = load(tmp_path, DEFAULT, DAAS, ROUTE, DAAS_ROUTE)
    assert [c.name for c in config.clients] == ["default", "daas"]
    assert config.client.name == "default"
    assert {r.prefix: r.client for r in config.routes} == {
        "/REST/demo/v1": "default",
        "/REST/daas/v1": "daas",
    }
    assert config.clients_by_name["daas"].private_key == tmp_path / "daas.key"


def test_a_clients_entry_named_default_is_the_default_without_a_client_table(
    tmp_path: Path,
) -> None:
    named_default = DAAS.replace('name = "daas"', 'name = "default"')
    config = load(tmp_path, named_default, CONSULT, ROUTE)
    assert [c.name for c in config.clients] == ["default", "consult"]
    assert config.routes[0].client == "default"
    assert config.client.id == "other:daas:client:confidential"


def test_several_clients_and_none_named_default_need_a_client_on_every_route(
    tmp_path: Path,
) -> None:
    consult_route = '\n[[routes]]\nprefix = "/REST/consult/v1"\nclient = "consult"\n'
    config = load(tmp_path, DAAS, CONSULT, DAAS_ROUTE, consult_route)
    assert default_client(config.clients) is None
    assert {r.client for r in config.routes} == {"daas", "consult"}
    assert failure(tmp_path, DAAS, CONSULT, DAAS_ROUTE, ROUTE) == (
        'routes[1].client: required: there are several clients and none is named "default" '
        "(known: daas, consult)"
    )


# --------------------------------------------------------------------------------------------
# Per-client assertion settings and scopes

OAUTH: Final = """
[oauth]
algorithm = "PS256"
key_id = "x5t#S256"
audience = "https://oauth-v5.acc.socialsecurity.be"
assertion_lifetime_s = 120
scopes = ["scope:demo:consult"]
"""


def test_clients_take_the_oauth_settings_unless_they_set_their_own(tmp_path: Path) -> None:
    own = (
        DAAS
        + 'algorithm = "ES256"\nkey_id = "daas-key-1"\naudience = "https://aud.example"\n'
        + 'assertion_lifetime_s = 60\nscopes = ["scope:daas:consult"]\n'
    )
    config = load(tmp_path, OAUTH, DEFAULT, CONSULT, own, ROUTE)
    default, consult, daas = config.clients
    inherited = {
        "algorithm": "PS256",
        "key_id": "x5t#S256",
        "audience": "https://oauth-v5.acc.socialsecurity.be",
        "assertion_lifetime_s": 120,
        "scopes": frozenset({"scope:demo:consult"}),
    }
    for client in (default, consult):
        assert {k: getattr(client, k) for k in inherited} == inherited, client.name
    assert {k: getattr(daas, k) for k in inherited} == {
        "algorithm": "ES256",
        "key_id": "daas-key-1",
        "audience": "https://aud.example",
        "assertion_lifetime_s": 60,
        "scopes": frozenset({"scope:daas:consult"}),
    }


def test_a_route_asks_for_its_clients_scopes_unless_it_names_its_own(tmp_path: Path) -> None:
    daas = DAAS + 'scopes = ["scope:daas:consult", "scope:daas:extra"]\n'
    own = '\n[[routes]]\nprefix = "/REST/daas/v2"\nclient = "daas"\nscopes = ["scope:daas:v2"]\n'
    config = load(tmp_path, OAUTH, DEFAULT, daas, ROUTE, DAAS_ROUTE, own)
    assert {r.prefix: r.scopes for r in config.routes} == {
        "/REST/demo/v1": frozenset({"scope:demo:consult"}),
        "/REST/daas/v1": frozenset({"scope:daas:consult", "scope:daas:extra"}),
        "/REST/daas/v2": frozenset({"scope:daas:v2"}),
    }


def test_a_clients_entry_has_the_password_options_of_client(tmp_path: Path) -> None:
    write(tmp_path / "daas.password", CANARY + "\n")
    from_file = load(tmp_path, DEFAULT, DAAS + 'password_file = "daas.password"\n', ROUTE)
    assert from_file.clients[1].password == Secret(CANARY)
    from_env = load(
        tmp_path,
        DEFAULT,
        DAAS + 'password_env = "DAAS_KEY_PASSWORD"\n',
        ROUTE,
        environ={"DAAS_KEY_PASSWORD": CANARY},
    )
    assert from_env.clients[1].password == Secret(CANARY)
    assert CANARY not in repr(from_env)


def test_the_same_certificate_may_serve_another_client_id(tmp_path: Path) -> None:
    # KSZ lets a partner reuse its certificate for a new client-id.
    reuse = CONSULT.replace('pkcs12 = "consult.p12"', 'pkcs12 = "acpt.p12"')
    config = load(tmp_path, DEFAULT, reuse, ROUTE)
    assert config.clients[0].pkcs12 == config.clients[1].pkcs12


def test_the_same_client_id_may_come_with_another_certificate(tmp_path: Path) -> None:
    other = CONSULT.replace("other:consult:client:confidential", DEFAULT_ID)
    config = load(tmp_path, DEFAULT, other, ROUTE)
    assert config.clients[0].id == config.clients[1].id


# --------------------------------------------------------------------------------------------
# Refusals: exit 2 naming the key

SAME_DAAS_FILES: Final = DAAS.replace('"daas"', '"daas2"', 1)

REFUSALS: Final = [
    (
        (DEFAULT, DAAS, DAAS.replace("other:daas", "other:daas2"), ROUTE),
        'clients[1].name: a client named "daas" is already set',
    ),
    (
        (DEFAULT, DAAS, ROUTE, DAAS_ROUTE.replace('"daas"', '"dass"')),
        'routes[1].client: no client is named "dass" (known: default, daas)',
    ),
    (
        (DEFAULT, DAAS.replace('name = "daas"', 'name = "default"'), ROUTE),
        'clients[0].name: "default" is the [client] table; give this client another name, '
        "or drop [client]",
    ),
    (
        (DEFAULT, DAAS, SAME_DAAS_FILES, ROUTE),
        'clients[1].id: client "daas" already has this id with the same key files',
    ),
    (
        (
            DEFAULT,
            CONSULT.replace("other:consult:client:confidential", DEFAULT_ID).replace(
                "consult.p12", "./acpt.p12"
            ),
            ROUTE,
        ),
        'clients[0].id: client "default" already has this id with the same key files',
    ),
    ((ROUTE,), "client: section [client] (or a [[clients]] entry) is required"),
    ((DAAS.replace('name = "daas"\n', ""), ROUTE), "clients[0].name: required"),
    ((DAAS.replace('"daas"', '"DaaS"', 1), ROUTE), "clients[0].name: must be lower-case"),
    ((DAAS.replace('"daas"', '"da as"', 1), ROUTE), "clients[0].name: must be lower-case"),
    ((DAAS.replace('"daas"', '""', 1), ROUTE), "clients[0].name: must be lower-case"),
    ((DAAS.replace('"daas"', "7", 1), ROUTE), "clients[0].name: must be a string"),
    ((DAAS + "colour = 1\n", ROUTE), "clients[0].colour: unknown key"),
    ((DAAS + 'token_url = "https://x.example/t"\n', ROUTE), "clients[0].token_url: unknown key"),
    ((DAAS.replace('id = "other:daas:client:confidential"\n', ""), ROUTE), "clients[0].id: req"),
    ((DAAS + 'algorithm = "HS256"\n', ROUTE), "clients[0].algorithm: must be one of"),
    ((DAAS + 'key_id = ""\n', ROUTE), "clients[0].key_id: must be none"),
    ((DAAS + 'audience = " "\n', ROUTE), "clients[0].audience: must not be empty"),
    ((DAAS + "assertion_lifetime_s = 5\n", ROUTE), "clients[0].assertion_lifetime_s: must be"),
    ((DAAS + 'scopes = ["a b"]\n', ROUTE), "clients[0].scopes[0]: not a valid OAuth scope"),
    ((DAAS + 'pkcs12 = "x.p12"\n', ROUTE), "clients[0].pkcs12: set either pkcs12"),
    (
        (DAAS.replace('private_key = "daas.key"\n', ""), ROUTE),
        "clients[0].private_key: required with clients[0].certificate",
    ),
    (
        (DAAS + 'password_env = "NOT_SET_ANYWHERE"\n', ROUTE),
        "clients[0].password_env: environment variable NOT_SET_ANYWHERE is not set",
    ),
    (
        (DAAS + 'password_file = "nowhere.password"\n', ROUTE),
        "clients[0].password_file: file",
    ),
    (('\n[clients]\nname = "daas"\n', ROUTE), "clients: must be an array of tables"),
    ((DEFAULT, ROUTE + "client = 1\n"), "routes[0].client: must be a string"),
]


@pytest.mark.parametrize(("parts", "expected"), REFUSALS, ids=[e for _, e in REFUSALS])
def test_refusals_name_the_key(tmp_path: Path, parts: tuple[str, ...], expected: str) -> None:
    assert failure(tmp_path, *parts).startswith(expected)


def test_a_symlinked_keystore_is_the_same_file(tmp_path: Path) -> None:
    write(tmp_path / "acpt.p12", "not read by the loader")
    (tmp_path / "link.p12").symlink_to(tmp_path / "acpt.p12")
    twin = CONSULT.replace("other:consult:client:confidential", DEFAULT_ID).replace(
        "consult.p12", "link.p12"
    )
    assert failure(tmp_path, DEFAULT, twin, ROUTE).startswith(
        'clients[0].id: client "default" already has this id with the same key files'
    )


def test_a_refused_client_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "daas.password", CANARY + "\n")
    daas = DAAS + 'password_file = "daas.password"\n'
    path = write(tmp_path / "ksz-proxy.toml", HEAD + DEFAULT + daas + daas + ROUTE, 0o644)
    for command in ("run", "check", "token"):
        assert main([command, "-c", str(path)]) == 2
        out, err = capsys.readouterr()
        assert 'clients[1].name: a client named "daas" is already set' in out + err, command
        assert CANARY not in out + err


def test_the_upstream_client_certificate_needs_a_single_client(tmp_path: Path) -> None:
    # One upstream connection pool presents one certificate: it would be the wrong one for the
    # other client's routes.
    mtls = '\n[upstream]\nurl = "https://rest.example"\nclient_certificate = true\n'
    assert load(tmp_path, DEFAULT, mtls, ROUTE).upstream.client_certificate
    assert failure(tmp_path, DEFAULT, DAAS, mtls, ROUTE) == (
        "upstream.client_certificate: not available with several clients"
    )


def test_client_config_defaults_are_the_oauth_defaults() -> None:
    # A [client] table with no [oauth] section gets these; keep them in step with OAuthConfig.
    from proxy.config import OAuthConfig

    oauth = OAuthConfig(token_url=None)
    client = ClientConfig(id="x")
    for name in ("algorithm", "key_id", "audience", "assertion_lifetime_s", "scopes"):
        assert getattr(client, name) == getattr(oauth, name), name
    assert {f.name for f in dataclasses.fields(ClientConfig)} >= {"name", "scopes"}
