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

__all__ = ["RunningServer", "ServerStartError", "run_server"]

STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 15.0
# Health of this service turns SERVING once every pagefusion service is ready.
READY_SERVICE = "pagefusion.v1.MachineService"


class ServerStartError(RuntimeError):
    """The server did not come up; the message includes its stderr."""


@dataclass
class RunningServer:
    """A pagefusion server subprocess started by :func:`run_server`."""

    address: str
    data_dir: Path
    allow_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs: Any) -> PageFusionClient:
        """A new client connected to this server (close it, or use ``with``)."""
        from pagefusion.clients.client import PageFusionClient

        return PageFusionClient(self.address, **kwargs)

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
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
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
        server = RunningServer(listen, data, allow, process, log_path, argv)
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
