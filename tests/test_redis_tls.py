"""TLS to Redis (rediss://), with a real redis-server that speaks TLS only.

The test makes its own CA and a certificate for 127.0.0.1, starts
redis-server with its plain port off, and runs a worker and an
orchestrator against it: the heartbeat (redis-py), the queue (kombu) and
the results (Celery's backend) all go over TLS, verified against the CA.
With another CA, fcq refuses to talk: the certificate is never taken on
trust (kombu's own default for rediss:// without options would).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.cluster import PASSWORD, Cluster, RedisServer, make_cluster

HostFactory = Any


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(directory: Path, common: str) -> tuple[Path, Any, Any]:
    """A CA: (its certificate's file, its key, its certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(_name(common))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{common}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(directory: Path, ca_key: Any, ca_cert: Any) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("redis"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class TlsRedisServer(RedisServer):
    """redis-server with its plain port off: TLS on self.port only."""

    def __init__(self) -> None:
        super().__init__()
        self.ca, ca_key, ca_cert = make_ca(self.dir, "fcq-test-ca")
        self.cert, self.key = make_server_cert(self.dir, ca_key, ca_cert)

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD,
                           decode_responses=True, ssl=True, ssl_ca_certs=str(self.ca),
                           ssl_cert_reqs=ssl.CERT_REQUIRED)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port),
             "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
             "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
             "--bind", "127.0.0.1", "--requirepass", PASSWORD, "--dir", str(self.dir),
             "--save", "", "--logfile", str(self.dir / "log")], stdout=subprocess.DEVNULL)
        self.wait_up()


@pytest.fixture
def tls_redis() -> Iterator[TlsRedisServer]:
    server = TlsRedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def test_everything_talks_tls_verified(make_host: HostFactory,
                                       tls_redis: TlsRedisServer) -> None:
    c: Cluster = make_cluster(make_host, tls_redis, ("alpha",),
                              tls_ca_file=str(tls_redis.ca))
    try:
        alpha = c.hosts["alpha"]
        alpha.write_vm("vm01")
        c.worker("alpha")  # its heartbeat came over TLS
        orch = c.orchestrator()
        started = orch.wait(orch.submit("start", "vm01"), timeout=120)
        assert started["status"] == "running"
        assert "vm01" in orch.hosts()["alpha"]["running"]
        cli = c.fcq("hosts")
        assert cli.returncode == 0 and "alpha" in cli.stdout, cli.stdout + cli.stderr
    finally:
        c.stop_all()


def test_a_certificate_from_another_ca_is_refused(make_host: HostFactory,
                                                  tls_redis: TlsRedisServer,
                                                  tmp_path: Path) -> None:
    other, _key, _cert = make_ca(tmp_path, "someone-else")
    c: Cluster = make_cluster(make_host, tls_redis, ("alpha",), tls_ca_file=str(other))
    try:
        cli = c.fcq("hosts", timeout=60)
        assert cli.returncode != 0
        assert "certificate verify failed" in cli.stderr, cli.stderr
    finally:
        c.stop_all()
