"""Build ``[egress]`` and a destination's ``proxy`` setting; the rules live in ``proxy.egress``."""

from __future__ import annotations

from collections.abc import Mapping

from proxy import egress as egress_rules
from proxy.config_reader import Table
from proxy.config_sections import ENV_NAME
from proxy.egress import EgressPolicy, ProxyChoice, ProxyServer
from proxy.errors import ConfigError
from proxy.secret import Secret, read_secret_file


def build_egress(t: Table, environ: Mapping[str, str]) -> EgressPolicy:
    """Validate ``[egress]``; the rules themselves live in ``proxy.egress``."""
    proxy_url = t.string("proxy_url")
    user = t.string("proxy_user")
    password_file = t.path("proxy_password_file")
    password_env = t.string("proxy_password_env")
    no_proxy = t.string_list("no_proxy")
    use_environment = bool(t.boolean("from_environment"))
    t.finish()
    if use_environment and proxy_url is not None:
        raise ConfigError("egress.proxy_url: set proxy_url or from_environment = true, not both")
    if use_environment and no_proxy is not None:
        raise ConfigError(
            "egress.no_proxy: with from_environment = true the list comes from NO_PROXY"
        )
    if not use_environment and proxy_url is None and no_proxy is not None:
        raise ConfigError("egress.no_proxy: needs egress.proxy_url")
    if password_file is not None and password_env is not None:
        raise ConfigError(
            "egress.proxy_password_file: set proxy_password_file or proxy_password_env, not both"
        )
    password: Secret | None = None
    if password_file is not None:
        password = read_secret_file(password_file, "egress.proxy_password_file")
        egress_rules.check_password(password.reveal(), "egress.proxy_password_file")
    elif password_env is not None:
        if not ENV_NAME.fullmatch(password_env):
            raise ConfigError("egress.proxy_password_env: must be an environment variable name")
        value = environ.get(password_env)
        if not value:
            raise ConfigError(
                f"egress.proxy_password_env: environment variable {password_env} is not set"
            )
        egress_rules.check_password(value, "egress.proxy_password_env")
        password = Secret(value)
    if user is not None:
        egress_rules.check_user(user, "egress.proxy_user")
        if password is None:
            raise ConfigError(
                "egress.proxy_user: needs egress.proxy_password_file or egress.proxy_password_env"
            )
    elif password is not None:
        raise ConfigError("egress.proxy_user: required with a proxy password")
    authorization = (
        Secret(egress_rules.basic_authorization(user, password.reveal()))
        if user is not None and password is not None
        else None
    )
    if use_environment:
        return egress_rules.policy_from_environment(environ, authorization)
    proxy = None
    if proxy_url is not None:
        address = egress_rules.parse_proxy_url(proxy_url, "egress.proxy_url")
        proxy = ProxyServer(
            host=address.host,
            port=address.port,
            authorization=authorization,
            source="egress.proxy_url",
        )
    return EgressPolicy(
        mode="none" if proxy is None else "explicit",
        proxy=proxy,
        no_proxy=egress_rules.parse_no_proxy(no_proxy or [], "egress.no_proxy"),
        authorization=authorization,
    )


def proxy_choice(t: Table, name: str, egress: EgressPolicy) -> ProxyChoice | None:
    """Read a destination's ``proxy`` setting; None when absent (the dataclass default)."""
    value = t.string(name)
    if value is None:
        return None
    choice = egress_rules.parse_choice(value, t.key(name))
    if isinstance(choice, str):
        return choice
    # A proxy named here uses the [egress] credentials, if any: one set per configuration.
    return ProxyServer(
        host=choice.host,
        port=choice.port,
        authorization=egress.authorization,
        source=t.key(name),
    )
