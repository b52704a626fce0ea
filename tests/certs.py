"""Throwaway certificates for the TLS tests: a test CA, a broker certificate for 127.0.0.1 and localhost,
a client certificate for mutual TLS, and an unrelated "wrong" CA, written as PEM files; and a self-signed
certificate such as a technician makes for the status page's HTTPS.

EC P-256 keys keep generation fast (milliseconds); the certificates are valid for one day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class CertificateSet:
    ca_file: Path           # the CA that signed the server and client certificates
    server_cert: Path       # for 127.0.0.1 (IP SAN) and localhost (DNS SAN)
    server_key: Path
    client_cert: Path       # for mutual TLS
    client_key: Path
    wrong_ca_file: Path     # a CA that signed nothing here


@dataclass(frozen=True, slots=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-agent tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    # Back-dated a little so a clock a few seconds apart between test and broker does not matter.
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY))


def _make_ca(common_name: str) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, _name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _Issued(cert, key)


def _issue(ca: _Issued, common_name: str, usage: x509.ObjectIdentifier,
           alt_names: list[x509.GeneralName] | None = None) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(common_name, ca.cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return _Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_test_certificates(directory: Path) -> CertificateSet:
    """Generate the whole set into `directory` (created if needed) and return the file paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca("edge-agent test CA")
    server = _issue(ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _issue(ca, "gw-test", ExtendedKeyUsageOID.CLIENT_AUTH)
    wrong_ca = _make_ca("unrelated CA")
    return CertificateSet(
        ca_file=_write_cert(directory / "ca.pem", ca.cert),
        server_cert=_write_cert(directory / "server.pem", server.cert),
        server_key=_write_key(directory / "server.key", server.key),
        client_cert=_write_cert(directory / "client.pem", client.cert),
        client_key=_write_key(directory / "client.key", client.key),
        wrong_ca_file=_write_cert(directory / "wrong-ca.pem", wrong_ca.cert),
    )


@dataclass(frozen=True, slots=True)
class SelfSigned:
    cert: Path       # a self-signed certificate for 127.0.0.1, as a technician makes one for the gateway's IP
    key: Path        # its key (mode 0600)
    other_key: Path  # a key of no certificate here


def make_self_signed(directory: Path, ip: str = "127.0.0.1") -> SelfSigned:
    """What `openssl req -x509 ... -addext subjectAltName=IP:...` makes (docs/troubleshooting.md): its own
    issuer, CA:TRUE as openssl's default, the IP as its subject alternative name, for server authentication."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"edge-agent {ip}")
    cert = (_builder(f"edge-agent {ip}", name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    return SelfSigned(cert=_write_cert(directory / "page.pem", cert), key=_write_key(directory / "page.key", key),
                      other_key=_write_key(directory / "other.key", ec.generate_private_key(ec.SECP256R1())))
