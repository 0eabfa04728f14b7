"""The real ``pagefusion-server`` process: restarts after kill -9, SIGTERM, JSON logs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagefusion.v1 import fusion_pb2, fusion_pb2_grpc, machine_pb2, machine_pb2_grpc

STARTUP = 60.0  # seconds allowed for the process to come up (a guard, not an assertion)


class Process:
    def __init__(self, tmp_path: Path, name: str, *extra: str) -> None:
        self.port_file = tmp_path / f"{name}.port"
        self.log_path = tmp_path / f"{name}.log"
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "pagefusion.server.main",
                    "--listen", "127.0.0.1:0",
                    "--data-dir", str(tmp_path / "data"),
                    "--port-file", str(self.port_file),
                    "--log-format", "json",
                    *extra,
                ],
                stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy(),
            )
        deadline = time.monotonic() + STARTUP
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(self.channel).result(STARTUP)
        self.machines = machine_pb2_grpc.MachineServiceStub(self.channel)
        self.fusion = fusion_pb2_grpc.FusionServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STARTUP)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]


@pytest.fixture
def spawn(tmp_path):
    procs: list[Process] = []

    def start(name: str, *extra: str) -> Process:
        procs.append(Process(tmp_path, name, *extra))
        return procs[-1]

    yield start
    for proc in procs:
        proc.channel.close()
        proc.kill()


def _create(proc: Process, machine_id: str, **fields) -> machine_pb2.Machine:
    machine = machine_pb2.Machine(
        memory_source=machine_pb2.MemorySource(adapter="memory", options={"size": "64KiB"}),
        **fields,
    )
    return proc.machines.CreateMachine(
        machine_pb2.CreateMachineRequest(machine_id=machine_id, machine=machine)
    )


def test_kill_9_loses_nothing(spawn):
    first = spawn("first")
    assert first.health.Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    created = [_create(first, f"vm-{i}", display_name=f"machine {i}") for i in range(5)]
    first.machines.UpdateMachine(machine_pb2.UpdateMachineRequest(
        machine=machine_pb2.Machine(name="machines/vm-1", page_fusion_enabled=True,
                                    fusion_domain="blue"),
        update_mask=field_mask_pb2.FieldMask(paths=["page_fusion_enabled", "fusion_domain"]),
    ))
    first.machines.DeleteMachine(machine_pb2.DeleteMachineRequest(name="machines/vm-4"))
    first.machines.StartMachine(machine_pb2.StartMachineRequest(name="machines/vm-0"))
    config = first.fusion.UpdateFusionConfig(fusion_pb2.UpdateFusionConfigRequest(
        config=fusion_pb2.FusionConfig(mode=fusion_pb2.FUSION_MODE_HINTS,
                                       stable_scans_before_merge=4),
        update_mask=field_mask_pb2.FieldMask(paths=["mode", "stable_scans_before_merge"]),
    ))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(STARTUP)

    second = spawn("second")
    listed = second.machines.ListMachines(machine_pb2.ListMachinesRequest()).machines
    assert [m.name for m in listed] == [f"machines/vm-{i}" for i in range(4)]
    assert all(m.state == machine_pb2.Machine.STATE_POWERED_OFF for m in listed)
    for before, after in zip(created, listed, strict=False):
        assert after.create_time == before.create_time
        assert after.display_name == before.display_name
    assert listed[1].page_fusion_enabled is True and listed[1].fusion_domain == "blue"
    assert second.fusion.GetFusionConfig(fusion_pb2.GetFusionConfigRequest()) == config
    started = second.machines.StartMachine(machine_pb2.StartMachineRequest(name="machines/vm-0"))
    assert started.state == machine_pb2.Machine.STATE_RUNNING


def test_sigterm_exits_0_and_logs_json(spawn):
    proc = spawn("server")
    proc.machines.ListMachines(
        machine_pb2.ListMachinesRequest(), metadata=[("x-request-id", "req-42")]
    )
    with pytest.raises(grpc.RpcError):
        proc.machines.GetMachine(machine_pb2.GetMachineRequest(name="machines/none"))
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(STARTUP) == 0
    lines = proc.log_lines()
    rpcs = [line for line in lines if line.get("event") == "rpc"]
    listed = [r for r in rpcs if r["method"] == "/pagefusion.v1.MachineService/ListMachines"]
    assert listed and listed[0]["request_id"] == "req-42" and listed[0]["code"] == "OK"
    assert isinstance(listed[0]["duration_ms"], float | int)
    got = [r for r in rpcs if r["method"] == "/pagefusion.v1.MachineService/GetMachine"]
    assert got[0]["code"] == "NOT_FOUND" and got[0]["request_id"]
    events = [line["event"] for line in lines]
    assert "serving" in events and "stopped" in events


def test_sigint_exits_0(spawn):
    proc = spawn("server")
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(STARTUP) == 0


def test_bad_listen_address_exits_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagefusion.server.main", "--listen", "256.1.1.1:99999",
         "--data-dir", str(tmp_path / "data"), "--log-format", "json"],
        capture_output=True, timeout=STARTUP, env=os.environ.copy(), check=False,
    )
    assert result.returncode != 0
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("choice", ["auto", "uvloop", "asyncio"])
def test_event_loop_serves_and_is_named_in_the_serving_line(spawn, choice):
    expected = {"asyncio": "asyncio", "uvloop": "uvloop",
                "auto": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"}[choice]
    proc = spawn("server", "--event-loop", choice)
    assert proc.health.Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    _create(proc, "vm-0")  # a start runs in a worker thread: the loop's executor
    started = proc.machines.StartMachine(machine_pb2.StartMachineRequest(name="machines/vm-0"))
    assert started.state == machine_pb2.Machine.STATE_RUNNING
    with pytest.raises(grpc.RpcError) as caught:
        proc.machines.GetMachine(machine_pb2.GetMachineRequest(name="machines/none"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(STARTUP) == 0
    lines = proc.log_lines()
    serving = next(line for line in lines if line["event"] == "serving")
    assert serving["event_loop"] == expected
    codes = [line["code"] for line in lines if line.get("event") == "rpc"
             and line["method"].startswith("/pagefusion.v1.MachineService/")]
    assert codes == ["OK", "OK", "NOT_FOUND"]
    assert "stopped" in [line["event"] for line in lines]


def test_unknown_event_loop_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagefusion.server.main", "--event-loop", "tokio",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, timeout=STARTUP, env=os.environ.copy(), check=False,
    )
    assert result.returncode == 2
    assert b"--event-loop: invalid choice: 'tokio'" in result.stderr
    assert b"Traceback" not in result.stderr
