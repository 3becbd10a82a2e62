"""One in-memory consortium authority for the test suite's sites (the secure default needs one).

Sites that do not trust the server pin an authority and present its credential; tests that run a
real job use :func:`secure_options` for each site and :func:`secure_job` for the server's config.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedveil.clients import ClientOptions
from fedveil.clients.policy import SitePolicy
from fedveil.secagg.local_authority import LocalAuthority

TEST_AUTHORITY = LocalAuthority("fedveil-tests")


def site_policy(**kw: Any) -> SitePolicy:
    """The secure-default policy of a test site: the test authority pinned."""
    return SitePolicy(authority_public_key=TEST_AUTHORITY.public_key.raw, consortium=TEST_AUTHORITY.consortium,
                      **kw)


def secure_options(name: str, *, policy: SitePolicy | None = None, **kw: Any) -> ClientOptions:
    """ClientOptions for site ``name``: its identity key and credential from the test authority."""
    key, credential = TEST_AUTHORITY.identity(name, now=int(time.time()))
    return ClientOptions(identity_key=key, credential=credential.encode(), policy=policy or site_policy(), **kw)


def secure_job(**settings: Any) -> dict[str, Any]:
    """ServerConfig fields with the test authority announced (active mode, the default)."""
    return {"consortium": TEST_AUTHORITY.consortium, "authority_public_key": TEST_AUTHORITY.public_key.raw.hex(),
            **settings}


def secure_federate(name: str, *, policy: SitePolicy | None = None) -> dict[str, Any]:
    """``federate(...)`` keyword arguments for site ``name``: its identity key, credential and policy."""
    key, credential = TEST_AUTHORITY.identity(name, now=int(time.time()))
    return {"identity_key": key, "credential": credential.encode(), "policy": policy or site_policy()}


def write_authority(path: Path) -> Path:
    """The test authority's public file (what ``--authority`` takes), written at ``path``."""
    from fedveil.protocol.identity_files import PinnedAuthority, authority_public_text

    path.write_text(authority_public_text(PinnedAuthority(TEST_AUTHORITY.consortium, TEST_AUTHORITY.public_key)))
    return path
