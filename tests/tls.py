"""Test certificates for Dask's mutual TLS: one CA, and scheduler, worker and client certificates.

Generated with ``cryptography`` (in the dev lock) at test time; nothing secret is stored in the repo.
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

ROLES = ("scheduler", "worker", "client")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    pairs: dict[str, Pair]

    def dask_config(self, roles: tuple[str, ...] = ROLES) -> dict[str, object]:
        """Dask settings for a process that may act as ``roles`` (Dask picks the pair by role)."""
        config: dict[str, object] = {
            "distributed.comm.require-encryption": True,
            "distributed.comm.tls.ca-file": str(self.ca),
            # Listen on tls:// when an address is given without a scheme (dask scheduler --host ...).
            "distributed.comm.default-scheme": "tls",
        }
        for role in roles:
            config[f"distributed.comm.tls.{role}.cert"] = str(self.pairs[role].cert)
            config[f"distributed.comm.tls.{role}.key"] = str(self.pairs[role].key)
        return config

    def dask_env(self, roles: tuple[str, ...] = ROLES) -> dict[str, str]:
        """The same settings as DASK_* environment variables, for subprocesses."""
        return {"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
                for key, value in self.dask_config(roles).items()}


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate(directory: Path, ca_name: str = "compute-api test CA") -> Certificates:
    """A fresh CA in ``directory`` and one certificate per role, valid for 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pairs = {}
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(_name(f"dask-{role}")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(validity[0]).not_valid_after(validity[1])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            # every Dask process is both a TLS server (it listens) and a TLS client (it connects)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pair = Pair(directory / f"{role}.pem", directory / f"{role}-key.pem")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key)
        pairs[role] = pair
    return Certificates(ca_path, pairs)
