"""The test harness: the pytest plugin's fixtures and run_server()."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clients_support import memory_source

from pagefusion.clients.client import PageFusionClient
from pagefusion.clients.testing import RunningServer, ServerStartError, run_server


def test_plugin_fixtures(
    pagefusion_server: RunningServer, pagefusion_client: PageFusionClient
) -> None:
    host, port = pagefusion_server.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert pagefusion_server.data_dir.is_dir()
    assert pagefusion_server.allow_dir.is_dir()
    assert pagefusion_client.target == pagefusion_server.address
    pagefusion_client.create_machine("w10", memory_source=memory_source())
    assert [m.name for m in pagefusion_client.list_machines()] == ["machines/w10"]


def test_allow_dir_is_readable_by_the_server(
    pagefusion_server: RunningServer, pagefusion_client: PageFusionClient
) -> None:
    image = pagefusion_server.allow_dir / "guest.img"
    image.write_bytes(b"\x01" * 4096 * 3 + bytes(4096))
    pagefusion_client.create_machine("img", memory_source=f"file:path={image}")
    pagefusion_client.start_machine("img")
    assert pagefusion_client.read_guest_memory("img", 0, 4) == b"\x01" * 4
    stats = pagefusion_client.get_fusion_stats()
    assert stats.host.zero_pages == 1


def test_sigterm_at_exit_and_registry_survives_restart(tmp_path: Path) -> None:
    with run_server(data_dir=tmp_path / "data") as server, server.client() as client:
        client.create_machine("keep", memory_source=memory_source())
        process = server.process
    assert process.returncode == 0  # stopped with SIGTERM: a graceful exit
    with run_server(data_dir=tmp_path / "data") as server, server.client() as client:
        assert client.get_machine("keep").name == "machines/keep"


def test_kill_is_sigkill() -> None:
    with run_server() as server:
        assert server.kill() == -signal.SIGKILL


def test_startup_failure_reports_stderr() -> None:
    with pytest.raises(ServerStartError) as caught, run_server(extra_args=["--no-such-flag"]):
        pass  # pragma: no cover
    message = str(caught.value)
    assert "exited with status 2" in message
    assert "--no-such-flag" in message  # argparse's complaint, from the server's stderr


def test_fixed_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with run_server(port=port) as server, server.client() as client:
        assert server.port == port
        client.wait_for_ready(5)


def test_importing_the_plugin_is_cheap() -> None:
    code = (
        "import sys, json, pagefusion.clients.testing\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'numpy')\n"
        "         or m.startswith(('pagefusion.server', 'pagefusion.v1'))]\n"
        "print(json.dumps(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout) == []


def test_pagefusion_testing_alias() -> None:
    """DESIGN.md names the harness `pagefusion.testing` (mapped in pyproject)."""
    alias = pytest.importorskip("pagefusion.testing")
    assert alias.run_server is run_server
