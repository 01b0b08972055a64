"""The rules for the arguments of :mod:`server.certs`: server names, site names, days, IPs.

Every check returns or raises a message naming the option, the value and the rule, so the
command line (:mod:`server.certs_cli`) can show all problems at once before anything is
written.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import unicodedata
from collections.abc import Sequence

from server.errors import CoordinatorError

SITE_NAME_RULE = "letters, digits, '-', '_' and '.', not starting with '.', at most 64 characters"
"""Human-readable rule for site key names (see :func:`server.certs.create_site_key`)."""

_SITE_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")

MAX_DAYS = 3650
"""Longest validity :func:`server.certs.init_certificates` accepts (10 years)."""

SERVER_NAME_RULE = (
    "a DNS name (dot-separated labels of ASCII letters, digits and '-', 1-63 characters "
    "each, not starting or ending with '-', at most 253 in all) or an IPv4/IPv6 address"
)
"""Human-readable rule for ``--server-name`` (see :func:`check_server_name`)."""

DAYS_RULE = f"a whole number of days from 1 to {MAX_DAYS} (825 is the default)"
"""Human-readable rule for ``--days``."""

_DNS_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAX_DNS_NAME = 253


def ip_or_none(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``value`` as an IPv4 or IPv6 address, or ``None`` when it is not one."""
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _character_problem(name: str) -> str:
    """The first whitespace, invisible or non-ASCII character of ``name`` ('' when none)."""
    for position, char in enumerate(name):
        category = unicodedata.category(char)
        if char.isspace() or category in {"Cc", "Cf", "Zs", "Zl", "Zp"}:
            label = unicodedata.name(char, "control character")
            kind = "a space" if char == " " else "an invisible character"
            return f"it contains {kind} (U+{ord(char):04X} {label}) at position {position}"
        if not char.isascii():
            hint = ""
            with contextlib.suppress(UnicodeError):
                ascii_form = name.encode("idna").decode()
                if not check_server_name(ascii_form):
                    hint = f"; write it in its ASCII form {ascii_form!r}"
            return (
                f"it contains the non-ASCII character {char!r} "
                f"(U+{ord(char):04X}) at position {position}{hint}"
            )
    return ""


def check_server_name(name: str) -> str:
    """Why ``name`` is not a valid ``--server-name`` ('' when it is).

    Parameters
    ----------
    name : str
        Host name or IP literal the sites use to reach the SuperLink.

    Returns
    -------
    str
        The problem, naming the option, the value and :data:`SERVER_NAME_RULE`; empty when
        the name is a DNS name or an IP address.
    """
    if ip_or_none(name) is not None:
        return ""
    problem = _character_problem(name)
    if not problem:
        labels = name.split(".")
        if not name:
            problem = "it is empty"
        elif len(name) > _MAX_DNS_NAME:
            problem = f"it has {len(name)} characters"
        elif bad := [label for label in labels if not _DNS_LABEL_RE.fullmatch(label)]:
            problem = f"label {bad[0]!r} breaks the rule"
        elif labels[-1].isdigit():
            problem = "it looks like an IP address but is not one"
    if not problem:
        return ""
    return f"--server-name {name!r} is not valid: {problem}. Use {SERVER_NAME_RULE}"


def check_certificate_request(server_name: str, ips: Sequence[str], days: int) -> list[str]:
    """Every problem with the arguments of :func:`server.certs.init_certificates`, at once.

    Parameters
    ----------
    server_name : str
        See :func:`check_server_name`.
    ips : Sequence[str]
        Extra IP addresses (``--ip``).
    days : int
        Validity (``--days``), 1 to :data:`MAX_DAYS`.

    Returns
    -------
    list of str
        One message per problem, each naming the option, the value and the rule.
    """
    problems = []
    if name_problem := check_server_name(server_name):
        problems.append(name_problem)
    for raw in ips:
        if ip_or_none(raw.strip()) is None:
            problems.append(f"--ip {raw!r} is not an IPv4 or IPv6 address")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        problems.append(f"--days {days!r} is out of range: use {DAYS_RULE}")
    return problems


def validate_site_name(name: str) -> None:
    """Check a site key name against :data:`SITE_NAME_RULE`.

    Parameters
    ----------
    name : str
        The site name, used as the private key's file name.

    Raises
    ------
    CoordinatorError
        The name breaks the rule; the message states the rule.
    """
    if not _SITE_NAME_RE.fullmatch(name):
        raise CoordinatorError(f"invalid site name {name!r}: use {SITE_NAME_RULE}")
