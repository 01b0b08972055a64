"""Reading and checking certificates: :func:`describe_certificate` and :func:`verify_chain`.

The check is :mod:`cryptography`'s X.509 path validation with the given CA as the only trust
anchor; when it fails, the reason is explained in plain words (wrong CA, expired, not yet
valid, wrong name, not a server certificate) before falling back to the verifier's message.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    Subject,
    VerificationError,
)

from server.certs_rules import check_server_name, ip_or_none
from server.errors import CoordinatorError


def utc_now() -> dt.datetime:
    """The current time, timezone-aware (UTC)."""
    return dt.datetime.now(dt.UTC)


def load_certificate(path: Path) -> x509.Certificate:
    """The X.509 certificate in ``path`` (PEM or DER).

    Raises
    ------
    CoordinatorError
        The file cannot be read or is not a certificate; the message names the file.
    """
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


def general_name_str(name: x509.GeneralName) -> str:
    """A subject alternative name as ``"DNS:..."``, ``"IP:..."``, ``"URI:..."``, ``"email:..."``."""
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
    return [general_name_str(n) for n in san]


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
    cert = load_certificate(path)
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
    address = ip_or_none(server_name)
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
    builder = PolicyBuilder().store(Store([ca])).time(utc_now())
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
    now = utc_now()
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
    ca = load_certificate(ca_cert)
    leaf = load_certificate(cert)
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
