"""Own the KSZ endpoint table (../shared/KSZ.md): environment and channel -> token URL, REST base.

``environment`` (with its aliases) and ``channel`` in the configuration choose a row; an explicit
``oauth.token_url`` or ``upstream.url`` overrides it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

Environment = Literal["test", "acpt", "prod"]
Channel = Literal["extranet", "internet"]

ENVIRONMENT_ALIASES: Final[Mapping[str, Environment]] = {
    "test": "test",
    "acpt": "acpt",
    "acceptance": "acpt",
    "prod": "prod",
    "production": "prod",
}

# (environment, channel) -> (token endpoint, REST base). Mind the KSZ.md erratum: the onboarding
# document repeats the acceptance hosts in its production table; production is production here.
ENDPOINTS: Final[Mapping[tuple[Environment, Channel], tuple[str, str]]] = {
    ("test", "extranet"): (
        "https://professionalservices-int.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b-test.ksz-bcss.fgov.be:4543",
    ),
    ("test", "internet"): (
        "https://services-int.socialsecurity.be/REST/oauth/v5/token",
        "https://api.test.ksz-bcss.fgov.be",
    ),
    ("acpt", "extranet"): (
        "https://professionalservices-acpt.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b-acpt.ksz-bcss.fgov.be:4543",
    ),
    ("acpt", "internet"): (
        "https://services-acpt.socialsecurity.be/REST/oauth/v5/token",
        "https://api.acpt.ksz-bcss.fgov.be",
    ),
    ("prod", "extranet"): (
        "https://professionalservices.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b.ksz-bcss.fgov.be:4543",
    ),
    ("prod", "internet"): (
        "https://services.socialsecurity.be/REST/oauth/v5/token",
        "https://api.ksz-bcss.fgov.be",
    ),
}

DISCOVERY_URLS: Final[Mapping[Environment, str]] = {
    "test": "https://oauth-v5.int.socialsecurity.be/.well-known/oauth-authorization-server",
    "acpt": "https://oauth-v5.acc.socialsecurity.be/.well-known/oauth-authorization-server",
    "prod": "https://oauth-v5.socialsecurity.be/.well-known/oauth-authorization-server",
}

CHANNELS: Final[tuple[Channel, ...]] = ("extranet", "internet")
