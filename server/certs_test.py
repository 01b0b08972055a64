"""Tests of :mod:`server.certs` and ``unicon certs`` (fast, no network beyond 127.0.0.1)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from server.certs import (
    CA_COMMON_NAME,
    DAYS_RULE,
    MAX_DAYS,
    SERVER_NAME_RULE,
    SITE_NAME_RULE,
    CertificatePaths,
    CertificateRequestError,
    create_site_key,
    describe_certificate,
    init_certificates,
    verify_chain,
)
from server.certs_cli import app
from server.errors import CoordinatorError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(path: Path) -> x509.SubjectAlternativeName:
    return _cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificatePaths:
    out = tmp_path_factory.mktemp("pki") / "certs"
    return init_certificates(out, server_name="coordinator.example.org", ips=["10.0.0.5", "::1"])


def test_init_writes_files_with_private_modes(pki: CertificatePaths) -> None:
    for path in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key):
        assert path.is_file()
    assert _mode(pki.ca_key) == 0o600
    assert _mode(pki.server_key) == 0o600
    assert _mode(pki.ca_cert.parent) == 0o700
    assert {p.name for p in pki.ca_cert.parent.iterdir()} == {
        "ca.crt",
        "ca.key",
        "server.pem",
        "server.key",
    }  # no temporary files left behind
    for key_path in (pki.ca_key, pki.server_key):
        text = key_path.read_bytes()
        assert text.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
        key = serialization.load_pem_private_key(text, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"


def test_ca_certificate_properties(pki: CertificatePaths) -> None:
    ca = _cert(pki.ca_cert)
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CA_COMMON_NAME
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert key.public_key() == ca.public_key()


def test_server_certificate_properties(pki: CertificatePaths) -> None:
    verify_chain(pki.ca_cert, pki.server_cert)
    ca = _cert(pki.ca_cert)
    server = _cert(pki.server_cert)
    cn = server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "coordinator.example.org"
    sans = _sans(pki.server_cert)
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    server_key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert server_key.public_key() == server.public_key()
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=825, minutes=10)


def test_describe_certificate(pki: CertificatePaths) -> None:
    info = describe_certificate(pki.server_cert)
    assert info["subject"] == "coordinator.example.org"
    assert info["issuer"] == CA_COMMON_NAME
    assert info["sans"] == ["DNS:coordinator.example.org", "IP:10.0.0.5", "IP:::1"]
    assert info["is_ca"] is False
    fingerprint = _cert(pki.server_cert).fingerprint(hashes.SHA256()).hex()
    assert info["sha256"] == fingerprint
    before = dt.datetime.fromisoformat(info["not_valid_before"])
    after = dt.datetime.fromisoformat(info["not_valid_after"])
    assert before < dt.datetime.now(dt.UTC) < after
    assert describe_certificate(pki.ca_cert)["is_ca"] is True


def test_describe_certificate_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(CoordinatorError, match=r"nope\.pem"):
        describe_certificate(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(CoordinatorError, match=r"garbage\.pem is not a valid X\.509"):
        describe_certificate(garbage)


def test_certificate_from_another_ca_fails(pki: CertificatePaths, tmp_path: Path) -> None:
    other = init_certificates(tmp_path / "other", server_name="coordinator.example.org")
    verify_chain(other.ca_cert, other.server_cert)
    # Same CA name, different key: only the signature check can tell them apart.
    with pytest.raises(CoordinatorError, match=r"signature of .*server\.pem does not verify"):
        verify_chain(pki.ca_cert, other.server_cert)
    # A certificate is not its own issuer unless self-signed.
    with pytest.raises(CoordinatorError, match="was issued by"):
        verify_chain(pki.server_cert, pki.server_cert)


def test_expired_certificate_fails(pki: CertificatePaths, tmp_path: Path) -> None:
    ca = _cert(pki.ca_cert)
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    path = tmp_path / "old.pem"
    path.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CoordinatorError, match=r"old\.pem expired"):
        verify_chain(pki.ca_cert, path)


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    paths = init_certificates(out, server_name="localhost")
    files = (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)
    before = {p: p.read_bytes() for p in files}
    with pytest.raises(CoordinatorError, match=r"ca\.crt.*--overwrite"):
        init_certificates(out, server_name="localhost")
    assert {p: p.read_bytes() for p in files} == before
    # One existing file is enough to refuse.
    paths.ca_cert.unlink()
    with pytest.raises(CoordinatorError, match=r"ca\.key.*already exist"):
        init_certificates(out, server_name="localhost")
    assert not paths.ca_cert.exists()
    renewed = init_certificates(out, server_name="localhost", overwrite=True)
    assert renewed == paths
    assert all(p.read_bytes() != before[p] for p in files if p != paths.ca_cert)
    verify_chain(renewed.ca_cert, renewed.server_cert)


def test_localhost_sans_and_ip_literal(tmp_path: Path) -> None:
    local = init_certificates(tmp_path / "a", server_name="localhost")
    assert describe_certificate(local.server_cert)["sans"] == ["DNS:localhost", "IP:127.0.0.1"]
    loopback = init_certificates(tmp_path / "b", server_name="127.0.0.1")
    assert describe_certificate(loopback.server_cert)["sans"] == ["IP:127.0.0.1", "DNS:localhost"]
    literal = init_certificates(tmp_path / "c", server_name="192.168.1.10", ips=["10.1.1.1"])
    sans = _sans(literal.server_cert)
    assert sans.get_values_for_type(x509.DNSName) == []
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == [
        "192.168.1.10",
        "10.1.1.1",
    ]
    with pytest.raises(CoordinatorError, match="not-an-ip"):
        init_certificates(tmp_path / "d", server_name="host", ips=["not-an-ip"])
    assert not (tmp_path / "d").exists()
    with pytest.raises(CoordinatorError, match="days"):
        init_certificates(tmp_path / "e", server_name="host", days=0)


def test_ssl_loads_the_files(pki: CertificatePaths) -> None:
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    assert any(c["subject"] == ((("commonName", CA_COMMON_NAME),),) for c in client.get_ca_certs())
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pki.server_cert), str(pki.server_key))


def _handshake(paths: CertificatePaths, server_hostname: str) -> str:
    """TLS handshake on 127.0.0.1; the client trusts only ca.crt. Returns the server's CN."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(paths.server_cert), str(paths.server_key))
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except (OSError, ssl.SSLError) as e:  # the client's failure shows up here too
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            subject = x509.load_der_x509_certificate(der).subject
            return str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    finally:
        thread.join(timeout=10)
        listener.close()


def test_tls_handshake_uses_the_sans(tmp_path: Path) -> None:
    paths = init_certificates(tmp_path / "tls", server_name="localhost")
    assert _handshake(paths, "localhost") == "localhost"
    assert _handshake(paths, "127.0.0.1") == "localhost"  # IP SAN
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(paths, "coordinator.example.org")
    other = init_certificates(tmp_path / "other", server_name="localhost")
    mixed = CertificatePaths(
        ca_cert=other.ca_cert,
        ca_key=other.ca_key,
        server_cert=paths.server_cert,
        server_key=paths.server_key,
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(mixed, "localhost")


# --------------------------------------------------------------------------- site keys


def test_site_key_pair(tmp_path: Path) -> None:
    paths = create_site_key(tmp_path / "keys", "hospital-a")
    assert paths.private_key == tmp_path / "keys" / "hospital-a"
    assert paths.public_key == tmp_path / "keys" / "hospital-a.pub"
    assert _mode(paths.private_key) == 0o600
    assert _mode(tmp_path / "keys") == 0o700
    private = serialization.load_ssh_private_key(paths.private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert paths.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")

    line = paths.public_key.read_text()
    assert line.startswith("ecdsa-sha2-nistp")
    assert line.endswith(" unicon-site:hospital-a\n")
    assert len(line.split()) == 3
    public = serialization.load_ssh_public_key(line.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public == private.public_key()

    message = b"node authentication challenge"
    signature = private.sign(message, ec.ECDSA(hashes.SHA256()))
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_site_key_rotation_leaves_other_sites_alone(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    a = create_site_key(out, "a")
    b = create_site_key(out, "b")
    a_before = (a.private_key.read_bytes(), a.public_key.read_bytes())
    b_before = (b.private_key.read_bytes(), b.public_key.read_bytes())

    with pytest.raises(CoordinatorError, match="--overwrite"):
        create_site_key(out, "a")
    assert (a.private_key.read_bytes(), a.public_key.read_bytes()) == a_before

    rotated = create_site_key(out, "a", overwrite=True)
    assert rotated == a
    assert a.private_key.read_bytes() != a_before[0]
    assert a.public_key.read_bytes() != a_before[1]
    assert _mode(a.private_key) == 0o600
    new_private = serialization.load_ssh_private_key(a.private_key.read_bytes(), password=None)
    assert serialization.load_ssh_public_key(a.public_key.read_bytes()) == new_private.public_key()
    assert (b.private_key.read_bytes(), b.public_key.read_bytes()) == b_before
    assert sorted(p.name for p in out.iterdir()) == ["a", "a.pub", "b", "b.pub"]


@pytest.mark.parametrize(
    "name", ["", ".hidden", "a/b", "../escape", "with space", "x" * 65, "é", "a:b"]
)
def test_invalid_site_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CoordinatorError) as info:
        create_site_key(tmp_path, name)
    assert SITE_NAME_RULE in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "site_1", "Hospital-B.v2", "x" * 64, "-"])
def test_valid_site_names(tmp_path: Path, name: str) -> None:
    assert create_site_key(tmp_path, name).public_key.name == f"{name}.pub"


# --------------------------------------------------------------------------- CLI


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_cli_init_site_show(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "certs"
    args = ["init", "--out", str(out), "--server-name", "coord.local", "--ip", "10.2.3.4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "DNS:coord.local" in result.output
    assert "IP:10.2.3.4" in result.output
    assert "0600" in result.output
    assert "unicon server start --certs" in _flat(result.output)
    verify_chain(out / "ca.crt", out / "server.pem")

    before = (out / "server.pem").read_bytes()
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1
    assert "--overwrite" in _flat(refused.output)
    assert (out / "server.pem").read_bytes() == before
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert (out / "server.pem").read_bytes() != before

    site = runner.invoke(app, ["site", "hospital-a", "--out", str(out)])
    assert site.exit_code == 0, site.output
    assert "unicon server add-site" in _flat(site.output)
    assert "unicon site run --auth-key" in _flat(site.output)
    assert (out / "hospital-a").is_file()
    assert (out / "hospital-a.pub").read_text().startswith("ecdsa-sha2-nistp")
    assert runner.invoke(app, ["site", "hospital-a", "--out", str(out)]).exit_code == 1
    bad = runner.invoke(app, ["site", ".bad", "--out", str(out)])
    assert bad.exit_code == 1
    assert "not starting with '.'" in _flat(bad.output)

    shown = runner.invoke(app, ["show", str(out / "server.pem")])
    assert shown.exit_code == 0, shown.output
    assert "coord.local" in shown.output
    assert CA_COMMON_NAME in shown.output
    assert runner.invoke(app, ["show", str(out / "missing.pem")]).exit_code == 1


def test_cli_is_attached_to_root() -> None:
    from unicon_cli.main import SUBCOMMANDS

    assert SUBCOMMANDS["certs"][0] == "server.certs_cli"


# --------------------------------------------------------------------------- argument rules


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("coördinator", "non-ASCII character 'ö' (U+00F6) at position 2"),
        ("my server", "a space (U+0020 SPACE) at position 2"),
        ("a\u200bb", "an invisible character (U+200B ZERO WIDTH SPACE) at position 1"),
        ("coord\n", "U+000A"),
        ("bad_name", "label 'bad_name' breaks the rule"),
        ("-lead.example.org", "label '-lead' breaks the rule"),
        ("a..b", "label '' breaks the rule"),
        ("999.1.1.1", "looks like an IP address but is not one"),
        ("", "it is empty"),
    ],
)
def test_server_name_must_be_a_dns_name_or_ip(tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(CertificateRequestError) as info:
        init_certificates(tmp_path / "certs", server_name=name)
    message = str(info.value)
    assert f"--server-name {name!r} is not valid" in message
    assert reason in message and SERVER_NAME_RULE in message
    assert not (tmp_path / "certs").exists()  # nothing was written


def test_unicode_name_gets_its_ascii_form(tmp_path: Path) -> None:
    with pytest.raises(CertificateRequestError, match="ASCII form 'xn--cordinator-fcb'"):
        init_certificates(tmp_path, server_name="coördinator")
    paths = init_certificates(tmp_path / "idn", server_name="xn--cordinator-fcb")
    assert describe_certificate(paths.server_cert)["sans"] == ["DNS:xn--cordinator-fcb"]


@pytest.mark.parametrize("days", [0, -1, MAX_DAYS + 1, 10_000_000])
def test_days_out_of_range_are_refused(tmp_path: Path, days: int) -> None:
    with pytest.raises(CertificateRequestError) as info:
        init_certificates(tmp_path / "certs", server_name="localhost", days=days)
    assert f"--days {days} is out of range" in str(info.value) and DAYS_RULE in str(info.value)
    assert not (tmp_path / "certs").exists()


def test_longest_validity_is_accepted(tmp_path: Path) -> None:
    paths = init_certificates(tmp_path, server_name="localhost", days=MAX_DAYS)
    lifetime = (
        _cert(paths.server_cert).not_valid_after_utc - _cert(paths.server_cert).not_valid_before_utc
    )
    assert dt.timedelta(days=MAX_DAYS) <= lifetime <= dt.timedelta(days=MAX_DAYS, minutes=10)


def test_cli_reports_every_bad_option_with_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = CliRunner().invoke(
        app,
        [
            "init",
            "--out",
            str(out),
            "--server-name",
            "my server",
            "--ip",
            "not-an-ip",
            "--days",
            "10000000",
        ],
    )
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert "--server-name 'my server' is not valid" in text and "DNS name" in text
    assert "--ip 'not-an-ip' is not an IPv4 or IPv6 address" in text
    assert (
        f"--days 10000000 is out of range: use a whole number of days from 1 to {MAX_DAYS}" in text
    )
    assert not out.exists()


def test_cli_existing_files_are_still_exit_1(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    init_certificates(out, server_name="localhost")
    result = CliRunner().invoke(app, ["init", "--out", str(out), "--server-name", "localhost"])
    assert result.exit_code == 1 and "--overwrite" in _flat(result.output)


# --------------------------------------------------------------------------- verify_chain policy


def _chain(
    tmp_path: Path,
    ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    leaf_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    ca_name: str = "Test CA",
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.SERVER_AUTH,
) -> tuple[Path, Path]:
    """A CA and a server leaf for ``localhost`` written as ``ca.crt`` and ``leaf.pem``."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    ca_path, leaf_path = tmp_path / "ca.crt", tmp_path / "leaf.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return ca_path, leaf_path


def test_verify_chain_checks_the_server_name(pki: CertificatePaths, tmp_path: Path) -> None:
    for name in ("coordinator.example.org", "10.0.0.5", "::1"):
        verify_chain(pki.ca_cert, pki.server_cert, server_name=name)
    for server_name in ("localhost", "127.0.0.1"):
        local = init_certificates(tmp_path / server_name, server_name=server_name)
        verify_chain(local.ca_cert, local.server_cert, server_name="localhost")
        verify_chain(local.ca_cert, local.server_cert, server_name="127.0.0.1")
        with pytest.raises(CoordinatorError, match=r"not valid for server name '127\.0\.0\.2'"):
            verify_chain(local.ca_cert, local.server_cert, server_name="127.0.0.2")

    with pytest.raises(CoordinatorError) as info:
        verify_chain(pki.ca_cert, pki.server_cert, server_name="evil.example.org")
    assert str(info.value) == (
        f"{pki.server_cert} is not valid for server name 'evil.example.org' (its subject "
        "alternative names: DNS:coordinator.example.org, IP:10.0.0.5, IP:::1)"
    )
    with pytest.raises(CoordinatorError, match=r"not valid for server name '10\.0\.0\.6'"):
        verify_chain(pki.ca_cert, pki.server_cert, server_name="10.0.0.6")
    with pytest.raises(CoordinatorError, match="--server-name 'bad name' is not valid"):
        verify_chain(pki.ca_cert, pki.server_cert, server_name="bad name")


def test_verify_chain_refuses_a_certificate_of_another_ca(
    pki: CertificatePaths, tmp_path: Path
) -> None:
    ca_path, leaf_path = _chain(
        tmp_path, ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    )
    verify_chain(ca_path, leaf_path, server_name="localhost")
    with pytest.raises(CoordinatorError) as info:
        verify_chain(pki.ca_cert, leaf_path, server_name="localhost")
    assert str(info.value) == (
        f"{leaf_path} was issued by 'CN=Test CA', not by the CA in {pki.ca_cert} "
        f"('CN={CA_COMMON_NAME}')"
    )
    # Another CA that copies the federation CA's name is caught by the signature.
    impostor_ca, impostor_leaf = _chain(
        tmp_path / "impostor",
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
        ca_name=CA_COMMON_NAME,
    )
    verify_chain(impostor_ca, impostor_leaf)
    with pytest.raises(CoordinatorError, match=r"signature of .*leaf\.pem does not verify"):
        verify_chain(pki.ca_cert, impostor_leaf, server_name="localhost")


def test_verify_chain_handles_rsa(tmp_path: Path) -> None:
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_path, leaf_path = _chain(tmp_path / "rsa", ca_key, ca_key)
    verify_chain(ca_path, leaf_path)
    verify_chain(ca_path, leaf_path, server_name="localhost")
    with pytest.raises(CoordinatorError, match=r"not valid for server name 'example\.org'"):
        verify_chain(ca_path, leaf_path, server_name="example.org")
    # Mixed key types: an ECDSA leaf under an RSA CA.
    _, mixed_leaf = _chain(tmp_path / "mixed", ca_key, ec.generate_private_key(ec.SECP256R1()))
    verify_chain(ca_path, mixed_leaf, server_name="localhost")
    # RSA below 2048 bits breaks the verification policy; the message quotes the verifier.
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_ca, weak_leaf = _chain(tmp_path / "weak", weak, weak)
    with pytest.raises(CoordinatorError) as info:
        verify_chain(weak_ca, weak_leaf)
    assert str(info.value).startswith(f"{weak_leaf} does not verify against the CA in {weak_ca}: ")
    assert "RSA" in str(info.value)


def test_verify_chain_server_name_needs_server_auth(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_path, leaf_path = _chain(tmp_path, key, key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    verify_chain(ca_path, leaf_path)  # the chain itself is fine
    with pytest.raises(CoordinatorError) as info:
        verify_chain(ca_path, leaf_path, server_name="localhost")
    assert str(info.value) == (
        f"{leaf_path} is not a TLS server certificate (its extended key usage lacks serverAuth)"
    )
