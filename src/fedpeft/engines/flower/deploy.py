"""What a multi-machine deployment needs besides Flower's own commands: the Flower App folder that
names the fedpeft ServerApp/ClientApp, TLS certificates, SuperNode keys and a SuperLink connection.

Each helper writes files only; docs/flower.md ("Several machines") shows the commands.
Keys are never overwritten unless asked (`force`): a key silently replaced locks a registered node
out, or leaves a copy of the old one behind. Private keys are created with mode 0600 from their first
byte (never written world-readable and chmod-ed afterwards).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from fedpeft.errors import FedPeftError


def _refuse_existing(paths, force: bool) -> None:
    existing = [str(p) for p in paths if Path(p).exists() or Path(p).is_symlink()]
    if existing and not force:
        raise FedPeftError(f"{existing[0]} exists: refusing to overwrite it (a replaced key locks out whoever "
                           "uses the old one); pass --force to replace it")


def _write_private(path: Path, data: bytes) -> None:
    """A private key file created with mode 0600 (owner only) from the start; an existing file (only
    reached with force) is removed first, so its old mode cannot leak into the new key."""
    if path.exists() or path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_public(path: Path, data: bytes) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)

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
                       days: int = 365, *, force: bool = False) -> dict[str, Path]:
    """A self-signed CA and a SuperLink certificate for `hosts` (names or IPs the nodes dial):
    ca.crt (give it to every SuperNode and `flwr` user), server.pem and server.key (SuperLink only).
    Existing files are kept (FedPeftError) unless `force`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    out = {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}
    _refuse_existing(out.values(), force)
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
    _write_private(out["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write_public(out["cert"], cert.public_bytes(pem))
    _write_public(out["ca"], ca.public_bytes(pem))
    return out


def write_node_key(path: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format: PATH (private, mode 0600, stays on the node) and
    PATH.pub (registered on the SuperLink with `flwr supernode register PATH.pub SUPERLINK`). Existing
    files are kept (FedPeftError) unless `force`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv, pub = Path(path), Path(str(path) + ".pub")
    _refuse_existing((priv, pub), force)
    priv.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    _write_public(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b" fedpeft-node\n")
    return priv, pub


INSECURE_WARNING = ("INSECURE: connection {name!r} to {address} has no TLS: everything `flwr` sends and receives "
                    "(run configs, logs, the Control API's commands) crosses the network in clear and the SuperLink "
                    "is not authenticated. Use it only on 127.0.0.1 or a network you trust; pass --root-certificates "
                    "CA_FILE otherwise.")


def write_connection(flwr_home: str | Path, name: str, address: str, *, root_certificates: str | None = None,
                     insecure: bool = False) -> Path:
    """Add (or replace) a SuperLink connection in FLWR_HOME/config.toml, the file `flwr run DIR NAME`
    reads; TLS with the CA `root_certificates`. Without a CA it refuses unless `insecure` is asked
    for explicitly (the caller then says loudly that the connection is insecure)."""
    import tomllib

    if not root_certificates and not insecure:
        raise FedPeftError(f"connection {name!r} has no CA: pass --root-certificates CA_FILE (the ca.crt of "
                           "`fedpeft flower certs`), or --insecure to write an unencrypted, unauthenticated "
                           "connection for 127.0.0.1 or a trusted network")
    if root_certificates and not Path(root_certificates).is_file():
        raise FedPeftError(f"--root-certificates {root_certificates}: no such file")

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
