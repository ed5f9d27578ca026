"""What a multi-machine deployment needs besides Flower's own commands: the Flower App folder that
names the fedpeft ServerApp/ClientApp, TLS certificates, SuperNode keys and a SuperLink connection.

Each helper writes files only; the README's "Multi-machine (Flower)" section shows the commands.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

APP_PYPROJECT = """\
# A Flower App whose components are fedpeft's ServerApp and ClientApp. fedpeft (with the flower extra)
# must be installed on the server and on every client machine; the app folder itself holds no code.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedpeft-app"
version = "{version}"
description = "fedpeft federated PEFT (FedLEASE and baselines) as a Flower App"
license = "Apache-2.0"
dependencies = ["fedpeft[flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedpeft"

[tool.flwr.app.components]
serverapp = "fedpeft.flower_app:server_app"
clientapp = "fedpeft.flower_app:client_app"

[tool.flwr.app.config]
# config: a fedpeft settings file (TOML, the keys of `fedpeft run --help`) on the server machine.
# output-dir: the run folder on the server machine (default: the file's output_dir, else runs/...).
# resume: a run folder to continue after the server stopped (clients need --node-config state-dir).
config = ""
output-dir = ""
resume = ""
"""


def write_app(directory: str | Path) -> Path:
    """Write the Flower App folder (pyproject.toml only) that `flwr run DIR SUPERLINK` submits."""
    from fedpeft import __version__

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__))
    return d


def write_certificates(directory: str | Path, hosts: list[str] | tuple[str, ...] = ("127.0.0.1", "localhost"),
                       days: int = 365) -> dict[str, Path]:
    """A self-signed CA and a SuperLink certificate for `hosts` (names or IPs the nodes dial):
    ca.crt (give it to every SuperNode and `flwr` user), server.pem and server.key (SuperLink only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    out = {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(pem))
    out["cert"].write_bytes(cert.public_bytes(pem))
    out["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    out["key"].chmod(0o600)
    return out


def write_node_key(path: str | Path) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format: PATH (private, stays on the node) and PATH.pub
    (registered on the SuperLink with `flwr supernode register PATH.pub SUPERLINK`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv, pub = Path(path), Path(str(path) + ".pub")
    priv.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b" fedpeft-node\n")
    return priv, pub


def write_connection(flwr_home: str | Path, name: str, address: str, *, root_certificates: str | None = None) -> Path:
    """Add (or replace) a SuperLink connection in FLWR_HOME/config.toml, the file `flwr run DIR NAME`
    reads; TLS with the CA `root_certificates`, or insecure when none is given."""
    import tomllib

    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    data = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = data.setdefault("superlink", {})
    links.setdefault("default", name)
    entry = {"address": address}
    if root_certificates:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        entry["insecure"] = True
    links[name] = entry
    import tomli_w  # a Flower dependency

    path.write_text(tomli_w.dumps(data))
    return path
