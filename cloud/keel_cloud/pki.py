"""The cloud's certificate authority: EC P-256 keys, certificates for the broker, the
fleet service and each device (CN = device id). Devices get DER (MicroPython reads
DER only); the host side keeps PEM."""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_CN = "keel-service"
VALID_DAYS = 3650

CA_KEY = "ca.key.pem"
CA_CERT = "ca.pem"
SERVER_PEM = "server.pem"  # broker certificate + key
SERVICE_PEM = "service.pem"  # the fleet service's client certificate + key
INSTANCES_DIR = "instances"  # NAME.pem: a fleet service instance's (serve --instance NAME)


def instance_cn(name: str) -> str:
    """The CN of fleet service instance NAME's certificate (never a device id: those are
    hex digits only)."""
    return f"{SERVICE_CN}-{name}"


@dataclass
class Identity:
    key_der: bytes  # SEC1 DER, as MicroPython's tls wants it
    cert_der: bytes
    key_pem: bytes
    cert_pem: bytes

    @property
    def pem(self) -> bytes:
        return self.cert_pem + self.key_pem


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.key = key
        self.cert = cert

    @classmethod
    def create(cls, name: str = "Keel Cloud CA") -> "CertificateAuthority":
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> "CertificateAuthority":
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        return cls(key, cert)

    def save(self, directory: Path) -> None:
        key_path = directory / CA_KEY
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        (directory / CA_CERT).write_bytes(self.cert_pem)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def issue(self, cn: str, server_names: list[str] = (), client: bool = True) -> Identity:
        """A new key and a certificate for cn. server_names makes it a server
        certificate (DNS names and IP addresses as SANs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server_names:
            sans: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            usage.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Identity(
            key_der=key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        )


def common_name(cert_der_or_pem: bytes) -> str:
    if cert_der_or_pem.startswith(b"-----"):
        cert = x509.load_pem_x509_certificate(cert_der_or_pem)
    else:
        cert = x509.load_der_x509_certificate(cert_der_or_pem)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
