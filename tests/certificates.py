"""Test certificates, the one way: trustme makes a throw-away CA and certificates signed by it.

Two layouts: Dask's mutual TLS for processes on this machine (one pair per role, ``generate``), and
the Secret the chart's TLS values mount (ca.crt, tls.crt, tls.key, as cert-manager issues it,
``write_tls_secret``). Nothing secret is stored in the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme

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


def generate(directory: Path, ca_name: str = "compute-api test CA") -> Certificates:
    """A fresh CA in ``directory`` and one certificate per Dask role, valid for 127.0.0.1 and localhost.

    trustme's certificates allow both server and client auth: every Dask process listens and connects.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name=ca_name)
    ca_path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    pairs = {}
    for role in ROLES:
        issued = ca.issue_cert("localhost", "127.0.0.1", common_name=f"dask-{role}")
        pair = Pair(directory / f"{role}.pem", directory / f"{role}-key.pem")
        issued.cert_chain_pems[0].write_to_path(str(pair.cert))
        issued.private_key_pem.write_to_path(str(pair.key))
        pair.key.chmod(0o600)
        pairs[role] = pair
    return Certificates(ca_path, pairs)


def write_tls_secret(directory: Path, dns_names: list[str], group_id: int | None = None) -> Path:
    """A CA and one certificate for ``dns_names`` laid out like a cert-manager Secret.

    With ``group_id`` the files are readable by that group only (the chart mounts the Secret with
    defaultMode 0440 and the pods' fsGroup); without, by anyone (a container running as any user).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="compute-api test CA")
    issued = ca.issue_cert(*dns_names, common_name=dns_names[0])
    files = {"ca.crt": ca.cert_pem, "tls.crt": issued.cert_chain_pems[0], "tls.key": issued.private_key_pem}
    for filename, blob in files.items():
        path = directory / filename
        blob.write_to_path(str(path))
        if group_id is None:
            path.chmod(0o444)
        else:
            os.chown(path, 0, group_id)
            path.chmod(0o440)
    directory.chmod(0o755)
    return directory
