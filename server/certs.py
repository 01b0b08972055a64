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

This module issues the material; the argument rules live in :mod:`server.certs_rules`, the
atomic file writing in :mod:`server.certs_files` and the inspection and chain check in
:mod:`server.certs_verify`, all re-exported here.

All files are written atomically (a temporary file in the same folder, then
:func:`os.replace`); private keys get mode ``0600`` and folders this module creates get
``0700``. Existing files are never replaced unless ``overwrite=True`` is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.certs_files import (
    PRIVATE_MODE,
    PUBLIC_MODE,
    ensure_dir,
    private_pem,
    refuse_existing,
    write_all,
)
from server.certs_rules import (
    DAYS_RULE,
    MAX_DAYS,
    SERVER_NAME_RULE,
    SITE_NAME_RULE,
    check_certificate_request,
    check_server_name,
    ip_or_none,
    validate_site_name,
)
from server.certs_verify import describe_certificate, general_name_str, utc_now, verify_chain
from server.errors import CoordinatorError

__all__ = [
    "CA_CERT_NAME",
    "CA_COMMON_NAME",
    "CA_KEY_NAME",
    "DAYS_RULE",
    "MAX_DAYS",
    "SERVER_CERT_NAME",
    "SERVER_KEY_NAME",
    "SERVER_NAME_RULE",
    "SITE_KEY_COMMENT_PREFIX",
    "SITE_NAME_RULE",
    "CertificatePaths",
    "CertificateRequestError",
    "SiteKeyPaths",
    "check_certificate_request",
    "check_server_name",
    "create_site_key",
    "describe_certificate",
    "init_certificates",
    "validate_site_name",
    "verify_chain",
]

logger = logging.getLogger(__name__)

CA_COMMON_NAME = "UNICON federation CA"
"""Subject common name of the federation CA created by :func:`init_certificates`."""

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"

SITE_KEY_COMMENT_PREFIX = "unicon-site:"
"""The comment after a site's OpenSSH public key is ``unicon-site:<name>``."""

_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1"})
_CLOCK_SKEW = dt.timedelta(minutes=5)


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

    literal = ip_or_none(server_name)
    add(x509.IPAddress(literal) if literal is not None else x509.DNSName(server_name))
    for raw in ips:
        address = ip_or_none(raw.strip())
        if address is None:
            raise CoordinatorError(f"--ip {raw!r} is not an IPv4 or IPv6 address")
        add(x509.IPAddress(address))
    if not ips and server_name in _LOCAL_NAMES:
        add(x509.DNSName("localhost"))
        add(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    return names


def _ca_name() -> x509.Name:
    """Subject (and issuer) of the federation CA."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """A key usage extension that allows only the given uses (a CA signs certificates and
    CRLs, the server signs its TLS handshakes)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    not_before: dt.datetime, not_after: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new federation CA key and its self-signed certificate (path length 0)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _ca_name()
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
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_cert


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    server_name: str,
    sans: list[x509.GeneralName],
    validity: tuple[dt.datetime, dt.datetime],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new TLS server key and its certificate for ``sans``, signed by the CA."""
    ca_name = _ca_name()
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    not_before, not_after = validity
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
        .add_extension(_key_usage(digital_signature=True), critical=True)
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
    return server_key, server_cert


@dataclass(frozen=True)
class _Pki:
    """The keys and certificates made by one :func:`init_certificates` call."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    server_cert: x509.Certificate


def _issue(server_name: str, sans: list[x509.GeneralName], days: int) -> _Pki:
    """A new CA and server certificate valid ``days`` days, back-dated for clock skew."""
    not_before = utc_now() - _CLOCK_SKEW
    not_after = not_before + _CLOCK_SKEW + dt.timedelta(days=days)
    ca_key, ca_cert = _ca_certificate(not_before, not_after)
    server_key, server_cert = _server_certificate(
        ca_key, server_name, sans, (not_before, not_after)
    )
    return _Pki(ca_key, ca_cert, server_key, server_cert)


def _write_pki(out: Path, paths: CertificatePaths, pki: _Pki) -> None:
    """Write the four files of ``pki`` (keys 0600, certificates 0644) into ``out``."""
    pem = serialization.Encoding.PEM
    ensure_dir(out)
    write_all(
        [
            (paths.ca_key, private_pem(pki.ca_key), PRIVATE_MODE),
            (paths.server_key, private_pem(pki.server_key), PRIVATE_MODE),
            (paths.ca_cert, pki.ca_cert.public_bytes(pem), PUBLIC_MODE),
            (paths.server_cert, pki.server_cert.public_bytes(pem), PUBLIC_MODE),
        ]
    )


def _certificate_paths(out: Path) -> CertificatePaths:
    """The four files :func:`init_certificates` writes into ``out``."""
    return CertificatePaths(
        ca_cert=out / CA_CERT_NAME,
        ca_key=out / CA_KEY_NAME,
        server_cert=out / SERVER_CERT_NAME,
        server_key=out / SERVER_KEY_NAME,
    )


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
    paths = _certificate_paths(out)
    refuse_existing([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], overwrite)
    sans = _subject_alt_names(server_name, ips)
    _write_pki(out, paths, _issue(server_name, sans, days))
    names = ", ".join(general_name_str(n) for n in sans)
    logger.info(
        "created federation CA and server certificate for %s in %s (SANs: %s)",
        server_name,
        out,
        names,
    )
    return paths


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
    refuse_existing([paths.private_key, paths.public_key], overwrite)

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

    ensure_dir(out)
    write_all(
        [
            (paths.private_key, private, PRIVATE_MODE),
            (paths.public_key, public_line, PUBLIC_MODE),
        ]
    )
    logger.info("created node authentication key pair for site %s in %s", name, out)
    return paths
