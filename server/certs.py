"""Certificates and keys for TLS and SuperNode authentication.

Everything here is generated with the :mod:`cryptography` package (no ``openssl`` shell-outs)
and nothing imports Flower, so the module is cheap to import from the command line.

Two kinds of material are produced:

* :func:`init_certificates` creates a small private PKI for the coordinator: a self-signed
  federation CA (``ca.crt``/``ca.key``) and a TLS server certificate signed by it
  (``server.pem``/``server.key``). The SuperLink serves ``server.pem``; every site trusts
  ``ca.crt`` (``--root-certificates``).
* :func:`create_site_key` creates one site's SuperNode authentication key pair in OpenSSH
  format (ECDSA on NIST P-384; Flower rejects ed25519 keys). The coordinator registers the
  public key, the site keeps the private key.

:func:`describe_certificate` and :func:`verify_chain` inspect and check the result.

All files are written atomically (a temporary file in the same folder, then
:func:`os.replace`); private keys get mode ``0600`` and folders this module creates get
``0700``. Existing files are never replaced unless ``overwrite=True`` is given.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    Subject,
    VerificationError,
)

from server.errors import CoordinatorError
from unicon_model.durable import write_temporary

logger = logging.getLogger(__name__)

CA_COMMON_NAME = "UNICON federation CA"
"""Subject common name of the federation CA created by :func:`init_certificates`."""

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"

SITE_KEY_COMMENT_PREFIX = "unicon-site:"
"""The comment after a site's OpenSSH public key is ``unicon-site:<name>``."""

SITE_NAME_RULE = "letters, digits, '-', '_' and '.', not starting with '.', at most 64 characters"
"""Human-readable rule for site key names (see :func:`create_site_key`)."""

_SITE_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")

MAX_DAYS = 3650
"""Longest validity :func:`init_certificates` accepts (10 years)."""

SERVER_NAME_RULE = (
    "a DNS name (dot-separated labels of ASCII letters, digits and '-', 1-63 characters "
    "each, not starting or ending with '-', at most 253 in all) or an IPv4/IPv6 address"
)
"""Human-readable rule for ``--server-name`` (see :func:`check_server_name`)."""

DAYS_RULE = f"a whole number of days from 1 to {MAX_DAYS} (825 is the default)"
"""Human-readable rule for ``--days``."""

_DNS_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAX_DNS_NAME = 253
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1"})
_CLOCK_SKEW = dt.timedelta(minutes=5)
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700


class CertificateRequestError(CoordinatorError):
    """Arguments of :func:`init_certificates` break a rule (a usage error: CLI exit 2).

    Parameters
    ----------
    problems : list of str
        One message per problem, each naming the option, the value and the rule.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class CertificatePaths:
    """Files written by :func:`init_certificates`.

    Attributes
    ----------
    ca_cert : Path
        The federation CA certificate (``ca.crt``), given to every site.
    ca_key : Path
        The CA private key (``ca.key``); keep it on the coordinator, offline if possible.
    server_cert : Path
        The SuperLink's TLS certificate (``server.pem``), signed by the CA.
    server_key : Path
        The SuperLink's TLS private key (``server.key``).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SiteKeyPaths:
    """Files written by :func:`create_site_key`.

    Attributes
    ----------
    private_key : Path
        OpenSSH private key (``<name>``), kept by the site (``--auth-key``).
    public_key : Path
        OpenSSH public key (``<name>.pub``), registered by the coordinator.
    """

    private_key: Path
    public_key: Path


# --------------------------------------------------------------------------- helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ensure_dir(out: Path) -> None:
    """Create ``out`` (and parents) with mode 0700 when missing; leave existing folders alone."""
    if out.exists():
        if not out.is_dir():
            raise CoordinatorError(f"{out} exists and is not a folder")
        return
    try:
        out.mkdir(parents=True, mode=_DIR_MODE)
        os.chmod(out, _DIR_MODE)  # mkdir's mode is filtered by the umask
    except OSError as e:
        raise CoordinatorError(f"cannot create folder {out}: {e}") from e


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        names = ", ".join(str(p) for p in existing)
        raise CoordinatorError(
            f"{names} already exist{'s' if len(existing) == 1 else ''}; "
            "refusing to replace keys or certificates (use --overwrite / overwrite=True)"
        )


def _write_all(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Atomically write each file: all temporaries first, then one ``os.replace`` each."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            temps.append((write_temporary(path, data, mode=mode), path))
        for tmp, path in temps:
            os.replace(tmp, path)
            logger.debug("wrote %s", path)
    except OSError as e:
        raise CoordinatorError(f"cannot write {path}: {e}") from e
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _ip_or_none(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _subject_alt_names(server_name: str, ips: Sequence[str]) -> list[x509.GeneralName]:
    """SANs of the server certificate.

    ``server_name`` becomes a ``DNSName`` (or an ``IPAddress`` when it is an IP literal) and
    every entry of ``ips`` an ``IPAddress``. When ``ips`` is empty and ``server_name`` is
    ``localhost`` or ``127.0.0.1``, both ``DNS:localhost`` and ``IP:127.0.0.1`` are included
    so either spelling works for local tests. Duplicates are dropped, order is kept.
    """
    names: list[x509.GeneralName] = []

    def add(name: x509.GeneralName) -> None:
        if name not in names:
            names.append(name)

    literal = _ip_or_none(server_name)
    add(x509.IPAddress(literal) if literal is not None else x509.DNSName(server_name))
    for raw in ips:
        address = _ip_or_none(raw.strip())
        if address is None:
            raise CoordinatorError(f"--ip {raw!r} is not an IPv4 or IPv6 address")
        add(x509.IPAddress(address))
    if not ips and server_name in _LOCAL_NAMES:
        add(x509.DNSName("localhost"))
        add(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    return names


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CoordinatorError(f"cannot read certificate {path}: {e}") from e
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise CoordinatorError(f"{path} is not a valid X.509 certificate (PEM or DER): {e}") from e


def _common_name(name: x509.Name) -> str:
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        return ""
    value = attributes[0].value
    return value.decode() if isinstance(value, bytes) else value


def _general_name_str(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    return str(name)


def _san_strings(cert: x509.Certificate) -> list[str]:
    """The subject alternative names of ``cert`` as ``"DNS:..."``/``"IP:..."`` strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [_general_name_str(n) for n in san]


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
    if _ip_or_none(name) is not None:
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
    """Every problem with the arguments of :func:`init_certificates`, at once.

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
        if _ip_or_none(raw.strip()) is None:
            problems.append(f"--ip {raw!r} is not an IPv4 or IPv6 address")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        problems.append(f"--days {days!r} is out of range: use {DAYS_RULE}")
    return problems


# --------------------------------------------------------------------------- public API


def init_certificates(
    out: Path,
    *,
    server_name: str,
    ips: Sequence[str] = (),
    days: int = 825,
    overwrite: bool = False,
) -> CertificatePaths:
    """Create a federation CA and a TLS server certificate signed by it.

    Parameters
    ----------
    out : Path
        Folder for ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key``; created with mode
        ``0700`` when missing.
    server_name : str
        Host name (or IP literal) the sites use to reach the SuperLink. It is the server
        certificate's common name and first subject alternative name (a ``DNSName``, or an
        ``IPAddress`` for an IP literal).
    ips : Sequence[str]
        Extra IP addresses put in the server certificate as ``IPAddress`` SANs. When empty and
        ``server_name`` is ``localhost`` or ``127.0.0.1``, both ``DNS:localhost`` and
        ``IP:127.0.0.1`` are added.
    days : int
        Validity of both certificates in days, 1 to :data:`MAX_DAYS` (825 by default, the
        longest browsers accept for server certificates). The start is back-dated 5 minutes
        for clock skew.
    overwrite : bool
        Replace existing files. Without it, any existing target file is an error.

    Returns
    -------
    CertificatePaths
        The four files written.

    Raises
    ------
    CertificateRequestError
        An argument breaks its rule; every problem is listed (nothing is written).
    CoordinatorError
        A target file exists and ``overwrite`` is false, or a file cannot be written.
    """
    out = Path(out)
    problems = check_certificate_request(server_name, ips, days)
    if problems:
        raise CertificateRequestError(problems)
    paths = CertificatePaths(
        ca_cert=out / CA_CERT_NAME,
        ca_key=out / CA_KEY_NAME,
        server_cert=out / SERVER_CERT_NAME,
        server_key=out / SERVER_KEY_NAME,
    )
    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    _refuse_existing(targets, overwrite)
    sans = _subject_alt_names(server_name, ips)

    not_before = _now() - _CLOCK_SKEW
    not_after = not_before + _CLOCK_SKEW + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    _ensure_dir(out)
    _write_all(
        [
            (paths.ca_key, _private_pem(ca_key), _PRIVATE_MODE),
            (paths.server_key, _private_pem(server_key), _PRIVATE_MODE),
            (paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE),
            (paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE),
        ]
    )
    logger.info(
        "created federation CA and server certificate for %s in %s (SANs: %s)",
        server_name,
        out,
        ", ".join(_general_name_str(n) for n in sans),
    )
    return paths


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


def create_site_key(out: Path, name: str, *, overwrite: bool = False) -> SiteKeyPaths:
    """Create a site's SuperNode authentication key pair in OpenSSH format.

    The key is ECDSA on NIST P-384 (Flower's SuperNode authentication accepts NIST-curve
    ECDSA keys only; ed25519 is rejected).

    Parameters
    ----------
    out : Path
        Folder for the keys; created with mode ``0700`` when missing.
    name : str
        Site name: letters, digits, ``-``, ``_`` and ``.``, not starting with ``.``, at most 64
        characters. The private key is written to ``out/<name>`` (mode ``0600``) and the public
        key to ``out/<name>.pub`` as ``ecdsa-sha2-nistp384 AAAA... unicon-site:<name>``.
    overwrite : bool
        Replace an existing key pair (key rotation). Without it, existing files are an error.

    Returns
    -------
    SiteKeyPaths
        The private and public key files.

    Raises
    ------
    CoordinatorError
        The name is invalid, a key file exists and ``overwrite`` is false, or a file cannot be
        written.
    """
    validate_site_name(name)
    out = Path(out)
    paths = SiteKeyPaths(private_key=out / name, public_key=out / f"{name}.pub")
    _refuse_existing([paths.private_key, paths.public_key], overwrite)

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH,
        format=serialization.PublicFormat.OpenSSH,
    )
    public_line = public + f" {SITE_KEY_COMMENT_PREFIX}{name}\n".encode()

    _ensure_dir(out)
    _write_all(
        [
            (paths.private_key, private, _PRIVATE_MODE),
            (paths.public_key, public_line, _PUBLIC_MODE),
        ]
    )
    logger.info("created node authentication key pair for site %s in %s", name, out)
    return paths


def describe_certificate(path: Path) -> dict[str, Any]:
    """Summarise a certificate file.

    Parameters
    ----------
    path : Path
        A PEM (or DER) X.509 certificate.

    Returns
    -------
    dict[str, Any]
        ``subject`` and ``issuer`` (common names), ``sans`` (list of ``"DNS:..."`` /
        ``"IP:..."`` strings), ``not_valid_before`` and ``not_valid_after`` (ISO 8601, UTC),
        ``is_ca`` (bool), ``serial`` (hex) and ``sha256`` (hex fingerprint of the DER bytes).

    Raises
    ------
    CoordinatorError
        The file cannot be read or is not a certificate; the message names the file.
    """
    cert = _load_certificate(path)
    sans = _san_strings(cert)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return {
        "subject": _common_name(cert.subject),
        "issuer": _common_name(cert.issuer),
        "sans": sans,
        "not_valid_before": cert.not_valid_before_utc.isoformat(),
        "not_valid_after": cert.not_valid_after_utc.isoformat(),
        "is_ca": is_ca,
        "serial": format(cert.serial_number, "x"),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


def _subject(server_name: str) -> Subject:
    """The verification subject for a host name or IP literal (checked by the name rule)."""
    if problem := check_server_name(server_name):
        raise CoordinatorError(problem)
    address = _ip_or_none(server_name)
    return x509.IPAddress(address) if address is not None else x509.DNSName(server_name)


def _run_verifier(ca: x509.Certificate, leaf: x509.Certificate, subject: Subject | None) -> None:
    """Verify ``leaf`` against the trust anchor ``ca`` with :mod:`cryptography`'s web PKI policy.

    With a ``subject`` this is a TLS server check (a SAN must match the subject and the
    extended key usage must allow ``serverAuth``); without one the same chain, signature,
    validity and extension rules apply but neither the name nor the key usage purpose is checked.

    Raises
    ------
    cryptography.x509.verification.VerificationError
        The certificate does not verify.
    """
    builder = PolicyBuilder().store(Store([ca])).time(_now())
    if subject is not None:
        builder.build_server_verifier(subject).verify(leaf, [])
        return
    any_purpose = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None
    )
    builder.extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=any_purpose
    ).build_client_verifier().verify(leaf, [])


def _explain_failure(
    ca_cert: Path, ca: x509.Certificate, cert: Path, leaf: x509.Certificate
) -> str:
    """A readable reason why ``leaf`` does not verify against ``ca`` ('' when none is found)."""
    try:
        leaf.verify_directly_issued_by(ca)
    except InvalidSignature:
        return (
            f"the signature of {cert} does not verify with the CA key in {ca_cert}: it was "
            "signed by a different CA with the same name"
        )
    except (ValueError, TypeError) as e:  # a key or signature algorithm cryptography lacks
        return f"the signature of {cert} cannot be checked with the CA key in {ca_cert}: {e}"
    now = _now()
    if now > ca.not_valid_after_utc:
        return f"{ca_cert} expired on {ca.not_valid_after_utc.isoformat()}"
    if now < leaf.not_valid_before_utc:
        return f"{cert} is not valid yet (from {leaf.not_valid_before_utc.isoformat()})"
    if now > leaf.not_valid_after_utc:
        return f"{cert} expired on {leaf.not_valid_after_utc.isoformat()}"
    return ""


def _explain_name_failure(cert: Path, leaf: x509.Certificate, server_name: str) -> str:
    """Why a ``leaf`` whose chain verifies is refused as the TLS certificate of ``server_name``."""
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        return f"{cert} is not a TLS server certificate (its extended key usage lacks serverAuth)"
    names = ", ".join(_san_strings(leaf)) or "none"
    return (
        f"{cert} is not valid for server name {server_name!r} "
        f"(its subject alternative names: {names})"
    )


def verify_chain(ca_cert: Path, cert: Path, *, server_name: str | None = None) -> None:
    """Check that ``cert`` was issued by the CA in ``ca_cert`` and is valid now.

    The check is :mod:`cryptography`'s X.509 path validation
    (:class:`~cryptography.x509.verification.PolicyBuilder`, web PKI rules) with ``ca_cert``
    as the only trust anchor, so every key type it supports (ECDSA, RSA of at least 2048 bits,
    Ed25519) can be checked. When ``server_name`` is given it is also the TLS client's check:
    a subject alternative name must match the name and the certificate must allow
    ``serverAuth``.

    Parameters
    ----------
    ca_cert : Path
        The CA certificate (e.g. ``ca.crt``).
    cert : Path
        The certificate to check (e.g. ``server.pem``).
    server_name : str, optional
        Host name or IP literal the sites connect to (see :func:`check_server_name`);
        ``None`` (the default) skips the name and purpose checks.

    Raises
    ------
    CoordinatorError
        ``server_name`` breaks the name rule, the issuer differs from the CA's subject, the CA
        is not a CA, the signature does not verify with the CA's public key, a certificate is
        not valid now, ``cert`` is not for ``server_name``, or it breaks another rule of the
        verification policy (the message then quotes the verifier).
    """
    subject = _subject(server_name) if server_name is not None else None
    ca = _load_certificate(ca_cert)
    leaf = _load_certificate(cert)
    if leaf.issuer != ca.subject:
        raise CoordinatorError(
            f"{cert} was issued by {leaf.issuer.rfc4514_string()!r}, "
            f"not by the CA in {ca_cert} ({ca.subject.rfc4514_string()!r})"
        )
    # The verifier trusts whatever its store holds, so ``ca_cert`` must itself be a CA.
    try:
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise CoordinatorError(f"{ca_cert} is not a CA certificate (BasicConstraints ca=False)")
    except x509.ExtensionNotFound as e:
        raise CoordinatorError(f"{ca_cert} is not a CA certificate (no BasicConstraints)") from e
    try:
        _run_verifier(ca, leaf, subject)
    except VerificationError as e:
        reason = _explain_failure(ca_cert, ca, cert, leaf)
        if not reason and server_name is not None:
            try:
                _run_verifier(ca, leaf, None)
                reason = _explain_name_failure(cert, leaf, server_name)
            except VerificationError:
                pass
        if not reason:
            reason = f"{cert} does not verify against the CA in {ca_cert}: {e}"
        raise CoordinatorError(reason) from e
