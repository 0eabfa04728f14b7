"""Test harness: a real pagefusion server for integration tests.

Installed as a pytest plugin (entry point ``pytest11: pagefusion``), so any
test in a project that installs pagefusion can ask for:

- ``pagefusion_server``: a server subprocess on a free loopback port, with a
  temporary data dir and a temporary directory memory sources may be
  opened under (``--allow-path``). Attributes: ``address``, ``data_dir``,
  ``allow_dir``, ``process``.
- ``pagefusion_client``: a :class:`~pagefusion.clients.client.PageFusionClient`
  connected to it.

Without pytest::

    from pagefusion.clients.testing import run_server

    with run_server() as server, server.client() as client:
        client.create_machine("w10", memory_source="synthetic-windows")

With TLS and tokens (:func:`make_tls_files` writes a throwaway CA, server
and client certificate; it needs the ``cryptography`` package)::

    files = make_tls_files(tmp_path)
    (tmp_path / "tokens").write_text("s3cret-token-for-tests\n")
    with run_server(extra_args=[*files.server_args(client_ca=True),
                                "--auth-token-file", str(tmp_path / "tokens")],
                    tls=files, token="s3cret-token-for-tests") as server:
        with server.client() as client:  # TLS, client certificate and token
            ...

Importing this module is cheap (pytest loads every installed plugin on every
run): gRPC, the generated code and the server are imported only when a
fixture or :func:`run_server` is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagefusion.clients.client import PageFusionClient

__all__ = ["RunningServer", "ServerStartError", "TlsFiles", "make_tls_files", "run_server"]

STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 15.0
# Health of this service turns SERVING once every pagefusion service is ready.
READY_SERVICE = "pagefusion.v1.MachineService"


class ServerStartError(RuntimeError):
    """The server did not come up; the message includes its stderr."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway PKI for tests (see :func:`make_tls_files`)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_args(self, *, client_ca: bool = False) -> list[str]:
        """``pagefusion-server`` flags serving TLS; ``client_ca``: also require client certs."""
        args = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        return [*args, "--tls-client-ca", str(self.ca)] if client_ca else args

    def client_kwargs(self, *, client_cert: bool = True) -> dict[str, Path]:
        """``PageFusionClient`` arguments: the CA, and the client certificate if asked."""
        kwargs = {"tls_ca": self.ca}
        if client_cert:
            kwargs |= {"tls_cert": self.client_cert, "tls_key": self.client_key}
        return kwargs


def make_tls_files(directory: str | os.PathLike[str], *, days: int = 2) -> TlsFiles:
    """Write a throwaway CA, a server certificate and a client certificate into ``directory``.

    The server certificate is valid for ``localhost``, ``127.0.0.1`` and
    ``::1``; both certificates are signed by the CA. Needs the
    ``cryptography`` package (``pip install 'pagefusion[dev]'``). For tests
    only: the keys are written unencrypted.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("pagefusion test CA")).issuer_name(name("pagefusion test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, usage: x509.ObjectIdentifier,
             names: list[x509.GeneralName]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ])
    client_cert, client_key = leaf("pagefusion test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    files = TlsFiles(out / "ca.pem", out / "server.pem", out / "server-key.pem",
                     out / "client.pem", out / "client-key.pem")
    pem = serialization.Encoding.PEM
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    files.client_cert.write_bytes(client_cert.public_bytes(pem))
    write_key(files.server_key, server_key)
    write_key(files.client_key, client_key)
    return files


@dataclass
class RunningServer:
    """A pagefusion server subprocess started by :func:`run_server`.

    ``client_kwargs`` (TLS files, token) are what :meth:`client` passes to
    every client it opens, unless overridden.
    """

    address: str
    data_dir: Path
    allow_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs: Any) -> PageFusionClient:
        """A new client connected to this server (close it, or use ``with``)."""
        from pagefusion.clients.client import PageFusionClient

        return PageFusionClient(self.address, **{**self.client_kwargs, **kwargs})

    def stderr_text(self) -> str:
        """Everything the server wrote to stderr so far (its logs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = SHUTDOWN_TIMEOUT) -> int:
        """Send ``sig`` (SIGTERM: graceful), wait, SIGKILL after ``timeout``; return the code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> int:
        """SIGKILL, as a crash would (for durability tests)."""
        return self.stop(signal.SIGKILL)


def _wait_ready(server: RunningServer, port_file: Path | None, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    # With --listen 127.0.0.1:0 the server writes the port it bound to port_file.
    while port_file is not None and not port_file.exists():
        _check_alive(server)
        if time.monotonic() > deadline:
            raise _start_error(server, f"no port file after {timeout:.0f}s")
        time.sleep(0.02)
    if port_file is not None:
        server.address = f"127.0.0.1:{int(port_file.read_text().strip())}"
    last = "no answer"
    # Health needs no token, but over TLS the handshake needs the CA (and,
    # with --tls-client-ca, a client certificate): the client's own channel.
    from pagefusion.clients.client import PageFusionClient

    kwargs = {key: value for key, value in server.client_kwargs.items() if key != "token"}
    with PageFusionClient(server.address, **kwargs) as health_client:
        stub = health_pb2_grpc.HealthStub(health_client.channel)
        while True:
            _check_alive(server)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _start_error(server, f"not SERVING after {timeout:.0f}s ({last})")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=READY_SERVICE),
                    timeout=min(remaining, 1.0),
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
            time.sleep(0.05)


def _check_alive(server: RunningServer) -> None:
    code = server.process.poll()
    if code is not None:
        raise _start_error(server, f"exited with status {code}")


def _start_error(server: RunningServer, what: str) -> ServerStartError:
    server.stop(signal.SIGKILL, timeout=5)
    stderr = server.stderr_text().strip() or "(nothing on stderr)"
    return ServerStartError(
        f"pagefusion server {what}\ncommand: {' '.join(server.argv)}\nstderr:\n{stderr}"
    )


@contextlib.contextmanager
def run_server(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    allow_dir: str | os.PathLike[str] | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
    tls: TlsFiles | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    token: str | None = None,
) -> Iterator[RunningServer]:
    """Start a pagefusion server subprocess; stop it (SIGTERM) on exit.

    Args:
        data_dir: the registry's directory (default: a fresh temporary one,
            removed afterwards).
        allow_dir: the directory sources may be opened under (default: a
            fresh temporary one).
        port: a loopback port to listen on (default: one the OS picks).
        extra_args: more ``pagefusion-server`` flags.
        env: the server's environment (default: this process's).
        startup_timeout: seconds to wait for the health service to say SERVING.
        tls: a :func:`make_tls_files` PKI the server uses (``extra_args``
            still choose the flags): the harness and :meth:`RunningServer.client`
            trust its CA and present its client certificate. The same as
            ``tls_ca``/``tls_cert``/``tls_key`` set to its files.
        tls_ca: the CA to trust when the server serves TLS (``--tls-cert``).
        tls_cert, tls_key: a client certificate, for ``--tls-client-ca``.
        token: the bearer token clients send (``--auth-token-file``); the
            health check needs none.

    Raises:
        ServerStartError: the server exited or was not SERVING in time; the
            message includes its stderr.
    """
    with contextlib.ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="pagefusion-test-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        data = Path(data_dir) if data_dir is not None else scratch / "data"
        allow = Path(allow_dir) if allow_dir is not None else scratch / "allow"
        data.mkdir(parents=True, exist_ok=True)
        allow.mkdir(parents=True, exist_ok=True)
        port_file = scratch / "port" if port is None else None
        listen = f"127.0.0.1:{port if port is not None else 0}"
        argv = [
            sys.executable,
            "-m",
            "pagefusion.server.main",
            "--listen",
            listen,
            "--data-dir",
            str(data),
            "--allow-path",
            str(allow),
            "--log-format",
            "json",
        ]
        if port_file is not None:
            argv += ["--port-file", str(port_file)]
        argv += list(extra_args)
        log_path = scratch / "server.log"
        log_file = stack.enter_context(open(log_path, "wb"))
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
        client_kwargs: dict[str, Any] = {}
        if tls is not None:
            client_kwargs |= tls.client_kwargs()
        for key, value in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key),
                           ("token", token)):
            if value is not None:
                client_kwargs[key] = value
        server = RunningServer(listen, data, allow, process, log_path, argv, client_kwargs)
        stack.callback(server.stop)
        _wait_ready(server, port_file, startup_timeout)
        yield server


# -- pytest plugin ----------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover (run_server works without pytest)
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def pagefusion_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
        """A real pagefusion server on a free loopback port, stopped with SIGTERM afterwards."""
        base = tmp_path_factory.mktemp("pagefusion")
        with run_server(data_dir=base / "data", allow_dir=base / "allow") as server:
            yield server

    @pytest.fixture
    def pagefusion_client(pagefusion_server: RunningServer) -> Iterator[PageFusionClient]:
        """A PageFusionClient connected to ``pagefusion_server``."""
        with pagefusion_server.client() as client:
            yield client
