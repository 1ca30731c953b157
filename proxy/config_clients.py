"""Build the clients: ``[client]`` (the client named "default") and each ``[[clients]]`` entry.

Names and identities are checked here (one client per identity); a route's ``client`` key is
resolved against them. ``proxy.config`` calls these builders; the sections are in
``proxy.config_sections``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

from proxy.config_reader import Table
from proxy.config_sections import (
    ALGORITHMS,
    DEFAULT_CLIENT,
    ENV_NAME,
    ClientConfig,
    OAuthConfig,
    default_client,
)
from proxy.errors import ConfigError
from proxy.secret import Secret, read_secret_file

_CLIENT_NAME = re.compile(r"[a-z0-9_-]+")


def build_clients(
    reader: Table, table: Table | None, oauth: OAuthConfig, environ: Mapping[str, str]
) -> tuple[ClientConfig, ...]:
    """Return [client] (if present) then every [[clients]] entry, names and identities checked."""
    clients: list[ClientConfig] = []
    if table is not None:
        clients.append(_with_oauth(_client(table, environ), oauth))
    for t in reader.table_list("clients"):
        client = _named_client(t, oauth, environ)
        if client.name == DEFAULT_CLIENT and table is not None:
            raise ConfigError(
                f'{t.key("name")}: "default" is the [client] table; give this client another '
                "name, or drop [client]"
            )
        twin = next((c for c in clients if c.name == client.name), None)
        if twin is not None:
            raise ConfigError(f'{t.key("name")}: a client named "{client.name}" is already set')
        twin = next((c for c in clients if _same_identity(c, client)), None)
        if twin is not None:
            raise ConfigError(
                f'{t.key("id")}: client "{twin.name}" already has this id with the same key '
                "files; one client per identity (routes choose scopes themselves)"
            )
        clients.append(client)
    if not clients:
        reader.refuse_near("client")
        reader.refuse_near("clients")
        raise ConfigError("client: section [client] (or a [[clients]] entry) is required")
    return tuple(clients)


def _named_client(t: Table, oauth: OAuthConfig, environ: Mapping[str, str]) -> ClientConfig:
    name = t.required_string("name")
    if not _CLIENT_NAME.fullmatch(name):
        raise ConfigError(f"{t.key('name')}: must be lower-case letters, digits, _ or - only")
    audience = t.string("audience")
    if audience is not None and not audience.strip():
        raise ConfigError(f"{t.key('audience')}: must not be empty")
    algorithm = t.choice("algorithm", ALGORITHMS)
    key_id = t.string("key_id")
    if key_id is not None and (not key_id or any(ord(c) < 0x20 for c in key_id)):
        raise ConfigError(
            f'{t.key("key_id")}: must be none, "x5t#S256", "x5t" or a printable string'
        )
    lifetime = t.integer("assertion_lifetime_s", low=10, high=3600)
    scopes = t.scopes("scopes")
    client = _with_oauth(_client(t, environ), oauth)  # reads the key files and finishes t
    return dataclasses.replace(
        client,
        name=name,
        where=t.where,
        algorithm=algorithm or client.algorithm,
        key_id=key_id or client.key_id,
        audience=audience or client.audience,
        assertion_lifetime_s=lifetime or client.assertion_lifetime_s,
        scopes=client.scopes if scopes is None else scopes,
    )


def _with_oauth(client: ClientConfig, oauth: OAuthConfig) -> ClientConfig:
    """Return ``client`` with the [oauth] assertion settings and scopes."""
    return dataclasses.replace(
        client,
        algorithm=oauth.algorithm,
        key_id=oauth.key_id,
        audience=oauth.audience,
        assertion_lifetime_s=oauth.assertion_lifetime_s,
        scopes=oauth.scopes,
    )


def _same_identity(a: ClientConfig, b: ClientConfig) -> bool:
    """Return True when two clients have the same id and the same key material files.

    Certificates in different files are compared once the credentials are loaded.
    """
    if a.id != b.id:
        return False
    files_a = (a.pkcs12,) if a.pkcs12 is not None else (a.private_key, a.certificate)
    files_b = (b.pkcs12,) if b.pkcs12 is not None else (b.private_key, b.certificate)
    return any(_same_file(x, y) for x in files_a for y in files_b)


def _same_file(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return a == b or a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: not our question to answer here
        return False


def route_client(t: Table, clients: tuple[ClientConfig, ...]) -> ClientConfig:
    """Return the client a route names, or the default client when it names none."""
    by_name = {client.name: client for client in clients}
    name = t.string("client")
    if name is None:
        name = default_client(clients)
        if name is None:
            raise ConfigError(
                f"{t.key('client')}: required: there are several clients and none is named "
                f'"default" (known: {", ".join(by_name)})'
            )
    client = by_name.get(name)
    if client is None:
        raise ConfigError(
            f'{t.key("client")}: no client is named "{name}" (known: {", ".join(by_name)})'
        )
    return client


def _client(t: Table, environ: Mapping[str, str]) -> ClientConfig:
    client_id = t.required_string("id")
    if not client_id.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in client_id):
        raise ConfigError(f"{t.key('id')}: must be a non-empty printable string")
    pkcs12 = t.path("pkcs12")
    private_key = t.path("private_key")
    certificate = t.path("certificate")
    password_file = t.path("password_file")
    password_env = t.string("password_env")
    t.finish()
    if pkcs12 is not None and (private_key is not None or certificate is not None):
        raise ConfigError(
            f"{t.key('pkcs12')}: set either pkcs12 or private_key + certificate, not both"
        )
    if pkcs12 is None:
        if private_key is None and certificate is None:
            raise ConfigError(
                f"{t.key('pkcs12')}: required (or set {t.key('private_key')} and "
                f"{t.key('certificate')})"
            )
        if private_key is None:
            raise ConfigError(f"{t.key('private_key')}: required with {t.key('certificate')}")
        if certificate is None:
            raise ConfigError(f"{t.key('certificate')}: required with {t.key('private_key')}")
    if password_file is not None and password_env is not None:
        raise ConfigError(f"{t.key('password_file')}: set password_file or password_env, not both")
    password: Secret | None = None
    if password_file is not None:
        password = read_secret_file(password_file, t.key("password_file"))
    elif password_env is not None:
        if not ENV_NAME.fullmatch(password_env):
            raise ConfigError(f"{t.key('password_env')}: must be an environment variable name")
        value = environ.get(password_env)
        if not value:
            raise ConfigError(
                f"{t.key('password_env')}: environment variable {password_env} is not set"
            )
        password = Secret(value)
    return ClientConfig(
        id=client_id,
        pkcs12=pkcs12,
        private_key=private_key,
        certificate=certificate,
        password_file=password_file,
        password_env=password_env,
        password=password,
    )
