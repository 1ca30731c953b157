"""Own the credentials of every client identity: load them all, reload them one by one.

A configuration holds one or more clients (``[client]`` is the one named "default", each
``[[clients]]`` entry another). At start every client's key and certificate must load, fit the
client's algorithm and be valid; two clients with the same id and the same certificate are
refused (the config loader already refuses the same key files, this catches copies).

A reload (SIGHUP) treats each client on its own: a running client whose new material fails keeps
running as it is (its settings and credentials) and is reported; the others take their new ones.
A client new in the file has nothing to keep: its failure refuses the whole reload.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import ClientConfig, Config, load_config
from proxy.credentials import Credentials, check_algorithm, load_credentials
from proxy.errors import ConfigError, ProxyError

# Each client's credentials by client name.
Keyring = Mapping[str, Credentials]


def algorithm_key(client: ClientConfig) -> str:
    """Return the key that sets ``client``'s algorithm, for messages."""
    return "oauth.algorithm" if client.where == "client" else f"{client.where}.algorithm"


def load_checked(client: ClientConfig) -> Credentials:
    """Load one client's credentials and check them as ``run`` needs them."""
    credentials = load_credentials(client)
    check_algorithm(credentials, client.algorithm, algorithm_key(client))
    return credentials


def load_keyring(config: Config) -> dict[str, Credentials]:
    """Load every client's credentials; refuse two clients with one id and one certificate."""
    keyring = {client.name: load_checked(client) for client in config.clients}
    check_identities(config.clients, keyring)
    return keyring


def load_setup(
    path: str | os.PathLike[str], environ: Mapping[str, str]
) -> tuple[Config, dict[str, Credentials]]:
    """Load the configuration and every client's credentials, checked as ``run`` needs them."""
    config = load_config(Path(path), environ)
    return config, load_keyring(config)


def check_identities(clients: tuple[ClientConfig, ...], keyring: Keyring) -> None:
    """Refuse two clients with the same id and the same certificate (one identity twice)."""
    seen: dict[tuple[str, bytes], ClientConfig] = {}
    for client in clients:
        identity = (client.id, keyring[client.name].sha256)
        twin = seen.setdefault(identity, client)
        if twin is not client:
            raise ConfigError(
                f'{client.where}.id: client "{twin.name}" already has this id with the same '
                "certificate; one client per identity (routes choose scopes themselves)"
            )


def keyring_for(config: Config, credentials: Credentials | Keyring) -> dict[str, Credentials]:
    """Return ``credentials`` by client name; one ``Credentials`` is the only client's."""
    if isinstance(credentials, Credentials):
        if len(config.clients) != 1:
            raise ValueError("several clients need their credentials by client name")
        return {config.clients[0].name: credentials}
    missing = [c.name for c in config.clients if c.name not in credentials]
    if missing:
        raise ValueError(f"no credentials for client {', '.join(missing)}")
    return {client.name: credentials[client.name] for client in config.clients}


@dataclass(slots=True)
class Reload:
    """The outcome of loading every client's credentials again: what to run, what failed."""

    clients: tuple[ClientConfig, ...]  # to run: the file's, or the running one where it failed
    keyring: dict[str, Credentials]
    changed: set[str] = field(default_factory=set)  # clients that took new credentials
    failures: dict[str, str] = field(default_factory=dict)  # client name -> error (no secret)

    @property
    def ok(self) -> bool:
        """Return True when every client reloaded."""
        return not self.failures


def reload_keyring(running: Config, fresh: Config, current: Keyring) -> Reload:
    """Load the credentials of every client of ``fresh`` (the file read again) on its own.

    A running client whose new material fails keeps running as it is (its table as it was and
    its current credentials) and is reported; the others take theirs. A client that does not
    run yet has nothing to keep: its failure raises the ``ConfigError`` that refuses the whole
    reload, as does one identity given to two clients. A client gone from ``fresh`` is dropped.
    """
    before = running.clients_by_name
    outcome = Reload(clients=fresh.clients, keyring={})
    clients: list[ClientConfig] = []
    for client in fresh.clients:
        old = before.get(client.name)
        try:
            credentials = load_checked(client)
        except ProxyError as exc:
            if old is None:
                raise ConfigError(exc.detail) from None
            outcome.failures[client.name] = exc.detail
            outcome.keyring[client.name] = current[client.name]
            clients.append(old)
            continue
        outcome.keyring[client.name] = credentials
        outcome.changed.add(client.name)
        clients.append(client)
    outcome.clients = tuple(clients)
    check_identities(outcome.clients, outcome.keyring)
    return outcome
