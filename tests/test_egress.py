"""The egress rules (proxy/egress.py) and the [egress] / per-destination configuration.

Pure functions and config loading only; the same rules against a real forward proxy are in
test_egress_proxy.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import Config, Secret, load_config, parse_config
from proxy.egress import (
    EgressPolicy,
    EgressRoute,
    ProxyServer,
    basic_authorization,
    decide,
    describe_destinations,
    destinations,
    ignored_variables,
    no_proxy_from_environment,
    parse_no_proxy,
    parse_proxy_url,
)
from proxy.errors import ConfigError

PASSWORD: Final = "proxy-canary-Secret-77a2"  # must never show up in a message or repr
AUTH: Final = Secret(basic_authorization("svc", PASSWORD))
PROXY: Final = ProxyServer(
    host="proxy.partner.local", port=3128, authorization=AUTH, source="egress.proxy_url"
)
CONFIG_DIR: Final = Path(__file__).parent.parent / "config"


def policy(no_proxy: list[str] | None = None) -> EgressPolicy:
    return EgressPolicy(
        mode="explicit",
        proxy=PROXY,
        no_proxy=parse_no_proxy(no_proxy or [], "egress.no_proxy"),
        authorization=AUTH,
    )


def route(p: EgressPolicy, url: str, choice: Any = "egress") -> EgressRoute:
    return decide(p, choice, url, key="upstream.proxy")


# -- deciding -----------------------------------------------------------------------------------


def test_without_egress_everything_is_direct() -> None:
    r = route(EgressPolicy(), "https://api.ksz-bcss.fgov.be")
    assert r.direct
    assert (r.host, r.port) == ("api.ksz-bcss.fgov.be", 443)
    assert r.request_options() == {}


def test_explicit_proxy_takes_everything_even_loopback_and_private_addresses() -> None:
    p = policy()
    for url in ("https://127.0.0.1:8443", "https://localhost", "https://10.1.2.3", "https://[::1]"):
        r = route(p, url)
        assert r.proxy == PROXY, url
        assert r.why == "egress.proxy_url"


def test_request_options_carry_the_proxy_and_its_authorization() -> None:
    options = route(policy(), "https://b2b.ksz-bcss.fgov.be:4543").request_options()
    assert options == {
        "proxy": "http://proxy.partner.local:3128",
        "proxy_headers": {"Proxy-Authorization": basic_authorization("svc", PASSWORD)},
    }


@pytest.mark.parametrize(
    ("entry", "host", "bypassed"),
    [
        ("b2b-acpt.ksz-bcss.fgov.be", "b2b-acpt.ksz-bcss.fgov.be", True),
        ("b2b-acpt.ksz-bcss.fgov.be", "B2B-ACPT.ksz-bcss.fgov.be.", True),  # case, trailing dot
        ("b2b-acpt.ksz-bcss.fgov.be", "x.b2b-acpt.ksz-bcss.fgov.be", False),  # exact only
        ("ksz-bcss.fgov.be", "b2b.ksz-bcss.fgov.be", False),
        (".internal.example", "a.internal.example", True),
        (".internal.example", "a.b.internal.example", True),
        (".internal.example", "internal.example", False),  # a suffix, not the domain itself
        (".internal.example", "evilinternal.example", False),
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.1.2.3", False),
        ("10.1.2.3", "10.1.2.3", True),
        ("::1", "::1", True),
        ("127.0.0.0/8", "localhost", False),  # names are never resolved to decide
    ],
)
def test_no_proxy_entries(entry: str, host: str, bypassed: bool) -> None:
    r = route(policy([entry]), f"https://{'[' + host + ']' if ':' in host else host}:4543")
    assert r.direct is bypassed
    if bypassed:
        assert r.why == f"egress.no_proxy {entry}"


def test_destination_choice_decides_alone() -> None:
    p = policy(["api.ksz-bcss.fgov.be"])
    direct = decide(p, "direct", "https://x.example", key="oauth.proxy")
    assert direct.direct
    assert direct.describe() == 'direct (oauth.proxy = "direct")'
    other = ProxyServer(host="other", port=8080, source="routes[0].proxy")
    # A proxy named for the destination is used even for a host listed in no_proxy.
    assert decide(p, other, "https://api.ksz-bcss.fgov.be", key="routes[0].proxy").proxy == other


def test_describe_never_shows_credentials() -> None:
    r = route(policy(), "https://api.ksz-bcss.fgov.be")
    text = r.describe()
    assert text == "via proxy proxy.partner.local:3128 (egress.proxy_url, with Proxy-Authorization)"
    for shown in (text, repr(r), repr(PROXY), repr(policy()), str(r)):
        assert PASSWORD not in shown
        assert AUTH.reveal() not in shown
        assert "svc" not in shown


# -- the environment ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host", "bypassed"),
    [
        ("example.com", "example.com", True),
        ("example.com", "api.example.com", True),  # the convention there: subdomains too
        (".example.com", "example.com", True),
        (".example.com", "api.example.com", True),
        ("*.example.com", "api.example.com", True),
        ("example.com:443", "example.com", True),
        ("foo, bar.example ,", "api.bar.example", True),
        ("example.com", "notexample.com", False),
        ("10.0.0.0/8", "10.9.9.9", True),
        ("", "example.com", False),
    ],
)
def test_environment_no_proxy(value: str, host: str, bypassed: bool) -> None:
    entries, bypass_all = no_proxy_from_environment(value)
    assert not bypass_all
    p = EgressPolicy(mode="environment", proxy=PROXY, no_proxy=entries)
    assert route(p, f"https://{host}").direct is bypassed


def test_environment_star_bypasses_everything() -> None:
    entries, bypass_all = no_proxy_from_environment("foo, *")
    assert bypass_all
    p = EgressPolicy(mode="environment", proxy=PROXY, no_proxy=entries, bypass_all=True)
    assert route(p, "https://api.ksz-bcss.fgov.be").why == "NO_PROXY=*"


def test_ignored_variables_lists_what_is_set() -> None:
    environ = {"HTTPS_PROXY": "http://p:1", "http_proxy": "", "ALL_PROXY": "socks5://p:2"}
    assert ignored_variables(environ) == ["HTTPS_PROXY", "ALL_PROXY"]


@given(
    st.from_regex(
        r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,8}[a-z0-9])?){0,3}", fullmatch=True
    )
)
def test_property_exact_entries_match_their_host_only(host: str) -> None:
    p = policy([host])
    assert route(p, f"https://{host}").direct
    assert not route(p, f"https://sub.{host}").direct
    assert not route(p, f"https://{host}x").direct


# -- proxy URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("https://proxy:3128", "https:// proxies (TLS to the proxy itself) are not supported"),
        ("http://proxy", "must name the proxy's port"),
        ("http://proxy:3128/path", "no path, query or fragment"),
        ("socks5://proxy:1080", "must be an http://host:port URL"),
        ("proxy:3128", "must be an http://host:port URL"),
        ("http://proxy:99999", "invalid port"),
        ("http://pro xy:3128", "no spaces or controls"),
        (f"http://svc:{PASSWORD}@proxy:3128", "must not contain credentials"),
    ],
)
def test_bad_proxy_urls_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_proxy_url(value, "egress.proxy_url")
    assert caught.value.detail.startswith("egress.proxy_url: ")
    assert message in caught.value.detail
    assert PASSWORD not in caught.value.detail


def test_environment_url_may_omit_the_scheme_and_carry_credentials() -> None:
    address = parse_proxy_url(
        "svc%40corp:p%3Ass@Proxy.Local:8080", "HTTPS_PROXY", from_environment=True
    )
    assert (address.host, address.port, address.user, address.password) == (
        "proxy.local",
        8080,
        "svc@corp",
        "p:ss",
    )
    assert "p:ss" not in repr(address)


# -- configuration --------------------------------------------------------------------------------


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


def load(
    tmp_path: Path,
    egress: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    **tables: Any,
) -> Config:
    data: dict[str, Any] = {
        "environment": "acpt",
        "channel": "internet",
        "client": {"id": "partner", "pkcs12": "acpt.p12"},
        "routes": [{"prefix": "/REST/demo/v1"}],
    }
    if egress is not None:
        data["egress"] = dict(egress)
    for name, value in tables.items():
        data[name] = value
    return parse_config(data, environ or {}, base_dir=tmp_path)


def error(tmp_path: Path, egress: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, egress, **kwargs)
    detail = caught.value.detail
    assert PASSWORD not in detail
    return detail


def test_no_egress_table_means_no_proxy_anywhere(tmp_path: Path) -> None:
    config = load(tmp_path, environ={"HTTPS_PROXY": "http://p:3128"})
    assert config.egress == EgressPolicy()
    assert all(r.direct for r in destinations(config).values())


def test_explicit_egress_with_password_file(tmp_path: Path) -> None:
    private(tmp_path / "proxy.password", PASSWORD + "\n")
    config = load(
        tmp_path,
        {
            "proxy_url": "http://proxy.partner.local:3128",
            "proxy_user": "svc",
            "proxy_password_file": "proxy.password",
            "no_proxy": ["api.acpt.ksz-bcss.fgov.be"],
        },
    )
    assert config.egress.proxy == PROXY
    assert describe_destinations(config) == {
        "oauth https://services-acpt.socialsecurity.be": "via proxy proxy.partner.local:3128 "
        "(egress.proxy_url, with Proxy-Authorization)",
        "upstream https://api.acpt.ksz-bcss.fgov.be": "direct (egress.no_proxy "
        "api.acpt.ksz-bcss.fgov.be)",
    }
    assert PASSWORD not in repr(config)


def test_password_from_the_environment(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {"proxy_url": "http://p:3128", "proxy_user": "svc", "proxy_password_env": "PROXY_PW"},
        environ={"PROXY_PW": PASSWORD},
    )
    assert config.egress.authorization == AUTH


@pytest.mark.parametrize(
    ("egress", "message"),
    [
        ({"proxy_url": "https://p:3128"}, "egress.proxy_url: https:// proxies"),
        ({"proxy_url": 3128}, "egress.proxy_url: must be a string"),
        ({"proxy_url": "http://p:3128", "proxy_user": "svc"}, "egress.proxy_user: needs"),
        ({"proxy_url": "http://p:3128", "proxy_password_env": "PW"}, "egress.proxy_user: required"),
        ({"proxy_user": "a:b", "proxy_password_env": "PW"}, "egress.proxy_user: must be"),
        (
            {"proxy_user": "svc", "proxy_password_env": "PW", "proxy_password_file": "f"},
            "egress.proxy_password_file: set proxy_password_file or proxy_password_env",
        ),
        ({"proxy_user": "svc", "proxy_password_env": "NOPE"}, "egress.proxy_password_env: "),
        ({"proxy_url": "http://p:1", "from_environment": True}, "egress.proxy_url: set"),
        ({"no_proxy": ["x"]}, "egress.no_proxy: needs egress.proxy_url"),
        ({"from_environment": True, "no_proxy": ["x"]}, "egress.no_proxy: with from_environment"),
        ({"proxy_url": "http://p:1", "no_proxy": ["*"]}, "egress.no_proxy[0]: must be"),
        ({"proxy_url": "http://p:1", "no_proxy": ["a", "b c"]}, "egress.no_proxy[1]: "),
        ({"proxy_url": "http://p:1", "no_proxy": "x"}, "egress.no_proxy: must be a list"),
        ({"proxy_uri": "http://p:1"}, "egress.proxy_uri: unknown key"),
        ({"from_environment": "yes"}, "egress.from_environment: must be true or false"),
    ],
)
def test_bad_egress_tables_name_the_key(
    tmp_path: Path, egress: dict[str, Any], message: str
) -> None:
    assert error(tmp_path, egress, environ={"PW": PASSWORD}).startswith(message)


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    private(tmp_path / "proxy.password", PASSWORD + "\n", 0o644)
    detail = error(
        tmp_path,
        {"proxy_url": "http://p:1", "proxy_user": "svc", "proxy_password_file": "proxy.password"},
    )
    assert detail.startswith("egress.proxy_password_file: ")
    assert "readable by group or others" in detail


def test_password_with_a_line_break_inside_is_refused(tmp_path: Path) -> None:
    private(tmp_path / "proxy.password", PASSWORD + "\nsecond line\n")
    detail = error(
        tmp_path,
        {"proxy_url": "http://p:1", "proxy_user": "svc", "proxy_password_file": "proxy.password"},
    )
    assert detail == "egress.proxy_password_file: the password contains control characters"


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"oauth": {"proxy": "sometimes"}}, "oauth.proxy: must be"),
        ({"upstream": {"proxy": "https://p:1"}}, "upstream.proxy: https:// proxies"),
        ({"routes": [{"prefix": "/REST/a", "proxy": "direct"}]}, "routes[0].proxy: only for"),
    ],
)
def test_bad_destination_settings_name_the_key(
    tmp_path: Path, tables: dict[str, Any], message: str
) -> None:
    assert error(tmp_path, None, **tables).startswith(message)


def test_destination_settings(tmp_path: Path) -> None:
    private(tmp_path / "proxy.password", PASSWORD + "\n")
    config = load(
        tmp_path,
        {"proxy_user": "svc", "proxy_password_file": "proxy.password"},
        oauth={"proxy": "http://token-proxy.local:8080"},
        upstream={"proxy": "direct"},
        routes=[
            {"prefix": "/REST/a"},
            {"prefix": "/REST/b", "upstream": "https://b.example", "proxy": "http://p2:3128"},
            {"prefix": "/REST/c", "upstream": "https://c.example"},
        ],
    )
    found = {label: r.describe() for label, r in destinations(config).items()}
    assert found == {
        "oauth https://services-acpt.socialsecurity.be": "via proxy token-proxy.local:8080 "
        "(oauth.proxy, with Proxy-Authorization)",
        "upstream https://api.acpt.ksz-bcss.fgov.be": 'direct (upstream.proxy = "direct")',
        "upstream https://b.example": "via proxy p2:3128 (routes[1].proxy, with "
        "Proxy-Authorization)",
        "upstream https://c.example": "direct (no egress proxy)",
    }


def test_from_environment(tmp_path: Path) -> None:
    environ = {
        "HTTPS_PROXY": "http://upper:1",
        "https_proxy": f"http://svc:{PASSWORD}@lower.local:3128",
        "NO_PROXY": "api.acpt.ksz-bcss.fgov.be",
    }
    config = load(tmp_path, {"from_environment": True}, environ=environ)
    assert config.egress.proxy == ProxyServer(
        host="lower.local", port=3128, authorization=AUTH, source="https_proxy"
    )
    found = {label: r.describe() for label, r in destinations(config).items()}
    assert found == {
        "oauth https://services-acpt.socialsecurity.be": "via proxy lower.local:3128 "
        "(https_proxy, with Proxy-Authorization)",
        "upstream https://api.acpt.ksz-bcss.fgov.be": "direct (NO_PROXY api.acpt.ksz-bcss.fgov.be)",
    }


def test_from_environment_without_a_proxy_variable_is_direct(tmp_path: Path) -> None:
    config = load(tmp_path, {"from_environment": True}, environ={})
    assert {r.why for r in destinations(config).values()} == {"no HTTPS_PROXY set"}


def test_from_environment_with_a_bad_variable_names_it(tmp_path: Path) -> None:
    environ = {"HTTPS_PROXY": f"https://svc:{PASSWORD}@p:3128"}
    detail = error(tmp_path, {"from_environment": True}, environ=environ)
    assert detail.startswith("egress.from_environment: HTTPS_PROXY: https:// proxies")


def test_from_environment_credentials_twice_are_refused(tmp_path: Path) -> None:
    environ = {"HTTPS_PROXY": f"http://svc:{PASSWORD}@p:3128", "PW": PASSWORD}
    egress = {"from_environment": True, "proxy_user": "svc", "proxy_password_env": "PW"}
    assert error(tmp_path, egress, environ=environ).startswith("egress.proxy_user: HTTPS_PROXY")


def test_internet_proxy_example_loads(tmp_path: Path) -> None:
    text = (CONFIG_DIR / "acpt-internet-proxy.toml").read_text(encoding="utf-8")
    private(tmp_path / "key-password", "x\n")
    private(tmp_path / "proxy-password", PASSWORD + "\n")
    text = re.sub(r'^password_file = ".*"$', 'password_file = "key-password"', text, flags=re.M)
    text = re.sub(
        r'^proxy_password_file = ".*"$', 'proxy_password_file = "proxy-password"', text, flags=re.M
    )
    (tmp_path / "ksz-proxy.toml").write_text(text, encoding="utf-8")
    config = load_config(tmp_path / "ksz-proxy.toml", {})
    assert config.channel == "internet"
    assert {r.describe() for r in destinations(config).values()} == {
        "via proxy proxy.partner.local:3128 (egress.proxy_url, with Proxy-Authorization)"
    }


def test_start_up_warns_when_proxy_variables_are_set_and_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy import server

    monkeypatch.setenv("HTTPS_PROXY", f"http://svc:{PASSWORD}@p:3128")
    server.warn_ignored_proxy_variables(load(tmp_path))
    (record,) = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert getattr(record, "variables", None) == "HTTPS_PROXY"
    assert PASSWORD not in caplog.text + str(vars(record))
    caplog.clear()
    server.warn_ignored_proxy_variables(load(tmp_path, {"from_environment": True}, os.environ))
    assert caplog.records == []


HTTP_CALLS: Final = frozenset(
    {"request", "get", "post", "put", "patch", "delete", "head", "options", "ws_connect"}
)


def test_proxies_are_chosen_only_by_the_egress_decision() -> None:
    # No call in the package names a proxy itself: each aiohttp client request that may use one
    # spreads EgressRoute.request_options(), the only place those options are built; the upstream
    # client's requests (forward.py) take ``egress=`` from the route's decision, mapped once by
    # forward._Egress.of.
    import ast

    root = Path(__file__).parent.parent / "proxy"
    spreads: list[str] = []
    tunnels: list[str] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr not in HTTP_CALLS:
                continue
            for keyword in node.keywords:
                assert keyword.arg not in ("proxy", "proxy_auth", "proxy_headers"), (
                    f"{path.name}:{node.lineno}"
                )
                if keyword.arg is None and "request_options" in ast.unparse(keyword.value):
                    spreads.append(path.name)
                if keyword.arg == "egress":
                    tunnels.append(f"{path.name}: {ast.unparse(keyword.value)}")
    assert sorted(spreads) == ["oauth.py"]
    assert tunnels == ["forward.py: egress.proxy"]
