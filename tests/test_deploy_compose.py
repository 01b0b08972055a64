"""deploy/compose.yaml: the CA private key is mounted into no container.

The coordinator needs ``ca.crt``, ``server.pem`` and ``server.key``; the CA key
(``certs/ca.key``) signs certificates on the host where ``unicon certs init`` ran and
stays there. A volume that mounts ``ca.key`` itself, or any folder holding it, would hand
anyone who breaks into the container the power to issue certificates the sites trust.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CA_KEY = PurePosixPath("certs/ca.key")
"""Where the documented workflow (``unicon certs init --out certs``) puts the CA key."""


def _sources(service: dict[str, Any]) -> list[str]:
    """Host paths of a service's bind mounts (short and long volume syntax)."""
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source = str(volume.get("source", ""))
        else:
            source = str(volume).split(":", 1)[0]
        if source.startswith((".", "/", "~")):  # a bind mount, not a named volume
            sources.append(source)
    return sources


def exposes_ca_key(source: str) -> bool:
    """Whether mounting host path ``source`` (relative to deploy/) exposes ``certs/ca.key``."""
    parts = [p for p in PurePosixPath(source).parts if p not in (".", "")]
    if source.startswith(("/", "~")) or ".." in parts:
        return True  # outside deploy/ or absolute: cannot tell, so refuse
    path = PurePosixPath(*parts) if parts else PurePosixPath(".")
    return path == CA_KEY or path == PurePosixPath(".") or path in CA_KEY.parents


@pytest.mark.parametrize(
    ("source", "exposed"),
    [
        ("./certs", True),
        ("./certs/", True),
        (".", True),
        ("./certs/ca.key", True),
        ("certs/ca.key", True),
        ("../deploy/certs", True),
        ("/etc/unicon/certs", True),
        ("./certs/ca.crt", False),
        ("./certs/server.key", False),
        ("./keys/hospital-a/hospital-a.pub", False),
    ],
)
def test_the_rule_itself(source: str, exposed: bool) -> None:
    assert exposes_ca_key(source) is exposed


def test_no_container_mounts_the_ca_private_key() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert "coordinator" in services
    leaks = {
        name: [s for s in _sources(service) if exposes_ca_key(s)]
        for name, service in services.items()
    }
    assert {k: v for k, v in leaks.items() if v} == {}


def test_the_coordinator_gets_what_the_superlink_needs() -> None:
    coordinator = yaml.safe_load(COMPOSE.read_text())["services"]["coordinator"]
    sources = set(_sources(coordinator))
    for name in ("ca.crt", "server.pem", "server.key"):
        assert f"./certs/{name}" in sources
    assert "--certs" in coordinator["command"]
    # only public site keys reach the coordinator
    site_keys = [s for s in sources if s.startswith("./keys/")]
    assert site_keys and all(s.endswith(".pub") for s in site_keys)


def test_the_readme_says_where_the_ca_key_stays() -> None:
    text = " ".join((DEPLOY / "README.md").read_text().split())
    assert "ca.key" in text and "never mounted" in text
