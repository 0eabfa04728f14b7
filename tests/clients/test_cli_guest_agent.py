"""`pagefusion guest-agent`: VirtualBox's page-sharing service loop.

Run against a scripted GuestMemoryService whose module list the test
changes between cycles.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from clients_support import Cli, Fake, module

from pagefusion.clients.testing import run_server


def test_once_registers_modules_and_checks(fake: Fake) -> None:
    guest = fake.guest_memory
    guest.modules = [module("ntdll.dll", 0x7FF800000000), module("kernel32.dll", 0x7FF810000000)]
    out = fake.cli().ok("guest-agent", "w10", "--once")
    assert guest.calls == [
        "GetPageSharingStatus machines/w10",
        "ListGuestModules machines/w10",
        "RegisterSharedModule ntdll.dll",
        "RegisterSharedModule kernel32.dll",
        "CheckSharedModules machines/w10",
    ]
    assert len(guest.registered) == 2
    line = out.strip()
    assert "guest-agent w10: 2 modules, registered 2, unregistered 0" in line
    assert "checked 8 pages, fused 4" in line


def test_once_json(fake: Fake) -> None:
    fake.guest_memory.modules = [module("ntdll.dll", 0x1000)]
    report = json.loads(fake.cli().ok("--json", "guest-agent", "machines/w10", "--once"))
    assert report["machine"] == "machines/w10"
    assert report["enabled"] is True
    assert report["registered"] == ["ntdll.dll 10.0.1@0x1000"]
    assert (report["pages_checked"], report["pages_fused"]) == (4, 2)
    assert report["completed"] is True


def test_already_registered_counts_as_registered(fake: Fake) -> None:
    guest = fake.guest_memory
    guest.modules = [module("ntdll.dll", 0x1000)]
    fake.cli().ok("guest-agent", "w10", "--once")
    # a restarted agent meets ALREADY_EXISTS: fine, the module is registered
    fake.cli().ok("guest-agent", "w10", "--once")
    assert len(guest.registered) == 1


def test_disabled_sharing_registers_nothing(fake: Fake) -> None:
    guest = fake.guest_memory
    guest.enabled = False
    guest.modules = [module("ntdll.dll", 0x1000)]
    out = fake.cli().ok("guest-agent", "w10", "--once")
    assert "page sharing disabled" in out
    assert guest.calls == ["GetPageSharingStatus machines/w10"]


def test_refused_module_fails_once_with_one_line(fake: Fake) -> None:
    guest = fake.guest_memory
    guest.modules = [module("evil.dll", 0x1000), module("ntdll.dll", 0x2000)]
    guest.refuse = {"evil.dll"}
    line = fake.cli().fails("guest-agent", "w10", "--once")
    assert line.startswith("pagefusion: error: register evil.dll 10.0.1@0x1000: INVALID_ARGUMENT")
    # the other module was still registered and checked
    assert [k[0] for k in guest.registered] == ["ntdll.dll"]
    assert guest.calls[-1] == "CheckSharedModules machines/w10"


def test_loop_unregisters_gone_modules_and_stops_on_sigterm(fake: Fake) -> None:
    guest = fake.guest_memory
    guest.modules = [module("ntdll.dll", 0x1000), module("old.dll", 0x9000)]
    process = fake.cli().popen("guest-agent", "w10", "--interval", "0.2")
    assert process.stdout is not None
    first = process.stdout.readline()
    assert "registered 2" in first
    guest.modules = [module("ntdll.dll", 0x1000)]  # old.dll unloaded in the guest
    deadline = time.monotonic() + 20
    while "UnregisterSharedModule old.dll" not in guest.calls:
        assert time.monotonic() < deadline, guest.calls
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert err == ""
    assert "unregistered 1" in out
    assert list(guest.registered) == [("ntdll.dll", "10.0.1", 0x1000, 0x4000)]
    # later cycles register nothing new (the server answers "already registered")
    assert out and all(", registered 0, " in line for line in out.splitlines())


def test_loop_registers_again_after_the_server_forgot(fake: Fake) -> None:
    guest = fake.guest_memory
    guest.modules = [module("ntdll.dll", 0x1000)]
    process = fake.cli().popen("--json", "guest-agent", "w10", "--interval", "0.2")
    assert process.stdout is not None
    assert json.loads(process.stdout.readline())["registered"] == ["ntdll.dll 10.0.1@0x1000"]
    guest.registered.clear()  # the machine was stopped and started: records gone
    deadline = time.monotonic() + 20
    while not guest.registered:
        assert time.monotonic() < deadline, guest.calls
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err


def test_loop_survives_errors(fake: Fake) -> None:
    guest = fake.guest_memory
    guest.modules = [module("evil.dll", 0x1000)]
    guest.refuse = {"evil.dll"}
    process = fake.cli().popen("guest-agent", "w10", "--interval", "0.1")
    deadline = time.monotonic() + 20
    while guest.calls.count("RegisterSharedModule evil.dll") < 2:
        assert time.monotonic() < deadline, guest.calls
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 0
    assert err.startswith("pagefusion: warning: guest-agent w10: register evil.dll")


def test_unreachable_server_once(fake: Fake) -> None:
    cli = fake.cli()
    cli.address = "127.0.0.1:1"
    assert "UNAVAILABLE" in cli.fails("guest-agent", "w10", "--once")


def test_agent_fuses_module_pages_on_a_real_server() -> None:
    """Hints mode (VirtualBox's behaviour): only the agent's modules fuse."""
    with run_server() as server:
        cli = Cli(server.address)
        cli.ok("fusion", "config", "--mode", "hints")
        for n in (1, 2):
            cli.ok(
                "createvm",
                "--name",
                f"w{n}",
                "--ostype",
                "Windows10_64",
                "--memory",
                "128",
                "--source",
                f"synthetic-windows:seed={n}",
                "--page-fusion",
                "on",
            )
            cli.ok("startvm", f"w{n}")
        saved_before = int(json.loads(cli.ok("--json", "fusion", "stats"))["host"]["pages_saved"])
        first = cli("--json", "guest-agent", "w1", "--once")
        if "UNIMPLEMENTED" in first.stderr:
            pytest.skip("the server does not serve the hint path yet")
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert report["enabled"] is True and report["modules"] > 0
        assert len(report["registered"]) == report["modules"]
        second = json.loads(cli.ok("--json", "guest-agent", "w2", "--once"))
        assert second["pages_fused"] > 0
        saved_after = int(json.loads(cli.ok("--json", "fusion", "stats"))["host"]["pages_saved"])
        assert saved_after > saved_before
        # a second cycle registers nothing new and unregisters nothing
        again = json.loads(cli.ok("--json", "guest-agent", "w2", "--once"))
        assert again["unregistered"] == []
