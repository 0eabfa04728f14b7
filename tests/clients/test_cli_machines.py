"""The installed `pagefusion` command against a real server: machines and fusion verbs."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from clients_support import Cli, memory_source


def test_createvm_list_showvminfo_unregistervm(cli: Cli, machine_id: str) -> None:
    out = cli.ok(
        "createvm",
        "--name",
        machine_id,
        "--memory",
        "4",
        "--ostype",
        "Windows10_64",
        "--source",
        memory_source(),
        "--page-fusion",
        "on",
        "--register",
    )
    assert out.splitlines() == [
        f"Virtual machine '{machine_id}' is created and registered.",
        f"ID: {machine_id}",
        f"Resource name: machines/{machine_id}",
    ]
    assert f'"{machine_id}" {{{machine_id}}}' in cli.ok("list", "vms").splitlines()
    info = cli.ok("showvminfo", machine_id).splitlines()
    assert "Page Fusion:                 on" in info
    assert "Memory size:                 4MB" in info
    assert "Guest OS:                    Windows10_64" in info
    assert "State:                       powered off" in info
    assert any(line.startswith("Memory source:") and "memory:" in line for line in info)
    readable = cli.ok("showvminfo", machine_id, "--machinereadable").splitlines()
    assert 'pagefusion="on"' in readable
    assert 'VMState="poweroff"' in readable
    assert cli.ok("unregistervm", machine_id, "--delete") == ""
    assert machine_id not in cli.ok("list", "vms")


def test_display_names_resolve_to_machines(cli: Cli, machine_id: str) -> None:
    display = f"Windows 10 {machine_id}"
    out = cli.ok("createvm", "--name", display, "--id", machine_id, "--source", memory_source())
    assert f"ID: {machine_id}" in out
    assert f'"{display}" {{{machine_id}}}' in cli.ok("list", "vms").splitlines()
    assert (
        f"ID:                          {machine_id}" in cli.ok("showvminfo", display).splitlines()
    )
    cli.ok("modifyvm", display, "--name", "Renamed " + machine_id)
    assert (
        "Name:                        Renamed " + machine_id
        in cli.ok("showvminfo", machine_id).splitlines()
    )
    cli.ok("unregistervm", machine_id)


def test_createvm_derives_an_id_from_a_free_form_name(cli: Cli, machine_id: str) -> None:
    out = cli.ok("createvm", "--name", f"XP {machine_id}", "--source", memory_source())
    assert f"ID: xp-{machine_id}" in out.splitlines()
    cli.ok("unregistervm", f"xp-{machine_id}")


def test_start_modify_poweroff(cli: Cli, machine_id: str) -> None:
    cli.ok("createvm", "--name", machine_id, "--source", memory_source(), "--page-fusion", "off")
    out = cli.ok("startvm", machine_id)
    # VBoxManage's progress steps (from load_progress) between the two lines
    assert out.splitlines() == [
        f'Waiting for VM "{machine_id}" to power on...',
        "0%...10%...20%...30%...40%...50%...60%...70%...80%...90%...100%",
        f'VM "{machine_id}" has been successfully started.',
    ]
    assert f'"{machine_id}" {{{machine_id}}}' in cli.ok("list", "runningvms").splitlines()
    info = cli.ok("showvminfo", machine_id).splitlines()
    assert "State:                       running" in info
    assert any(line.startswith("Guest pages:                 1024 ") for line in info)
    # VBoxManage modifyvm --page-fusion works only while powered off
    line = cli.fails("modifyvm", machine_id, "--page-fusion", "on")
    assert line.startswith("pagefusion: error: FAILED_PRECONDITION: ")
    line = cli.fails("unregistervm", machine_id)
    assert line.startswith("pagefusion: error: FAILED_PRECONDITION: ")
    assert cli.ok("controlvm", machine_id, "poweroff") == ""
    cli.ok("modifyvm", machine_id, "--page-fusion", "on", "--fusion-domain", "blue")
    info = cli.ok("showvminfo", machine_id).splitlines()
    assert "Page Fusion:                 on" in info
    assert "Fusion domain:               blue" in info
    assert "State:                       powered off" in info
    cli.ok("unregistervm", machine_id)


def test_json_output(cli: Cli, machine_id: str) -> None:
    created = json.loads(
        cli.ok(
            "--json", "createvm", "--name", machine_id, "--source", memory_source(), "--memory", "4"
        )
    )
    assert created["name"] == f"machines/{machine_id}"
    assert created["page_fusion_enabled"] is False
    assert created["state"] == "STATE_POWERED_OFF"
    # the flag works after the verb too
    listed = json.loads(cli.ok("list", "vms", "--json"))
    assert f"machines/{machine_id}" in [m["name"] for m in listed["machines"]]
    started = json.loads(cli.ok("startvm", machine_id, "--json"))
    assert started["state"] == "STATE_RUNNING"
    stats = json.loads(cli.ok("--json", "fusion", "stats"))
    host = {key: int(value) for key, value in stats["host"].items()}
    assert host["guest_pages"] == host["frames_used"] + host["pages_saved"] + host["zero_pages"]
    info = json.loads(cli.ok("--json", "showvminfo", machine_id))
    assert info["memory_size_bytes"] == str(4 * 1024 * 1024)
    stopped = json.loads(cli.ok("--json", "controlvm", machine_id, "poweroff"))
    assert stopped["state"] == "STATE_POWERED_OFF"
    assert json.loads(cli.ok("--json", "unregistervm", machine_id)) == {}


def test_fusion_verbs(cli: Cli, machine_id: str) -> None:
    for n in (1, 2):
        cli.ok(
            "createvm",
            "--name",
            f"{machine_id}-{n}",
            "--source",
            memory_source(seed=5),
            "--page-fusion",
            "on",
        )
        cli.ok("startvm", f"{machine_id}-{n}")
    try:
        stats = cli.ok("fusion", "stats")
        assert stats.startswith("Guest pages:")
        assert "Pages saved:" in stats
        assert "Profit:" in stats
        assert any(line.startswith(f"{machine_id}-1 ") for line in stats.splitlines())
        scan = cli.ok("fusion", "scan", f"{machine_id}-1", f"{machine_id}-2").splitlines()
        assert scan[0].startswith("Pages scanned:")
        assert cli.ok("fusion", "scan").startswith("Pages scanned:")
        before = json.loads(cli.ok("--json", "fusion", "config"))
        out = cli.ok(
            "fusion",
            "config",
            "--mode",
            "content",
            "--stable-scans",
            "2",
            "--background-scan",
            "off",
            "--pages-per-second",
            "1234",
        )
        assert out.splitlines() == [
            "Mode:                        content",
            "Background scan:             off",
            "Pages per second:            1234",
            "Stable scans before merge:   2",
        ]
        assert cli.ok("fusion", "config") == out
    finally:
        mode = before["mode"].removeprefix("FUSION_MODE_").lower()
        cli.ok(
            "fusion",
            "config",
            "--mode",
            mode,
            "--stable-scans",
            str(before["stable_scans_before_merge"]),
            "--pages-per-second",
            str(before["pages_per_second"]),
        )
        for n in (1, 2):
            cli.ok("controlvm", f"{machine_id}-{n}", "poweroff")
            cli.ok("unregistervm", f"{machine_id}-{n}")


def test_errors_are_one_line(cli: Cli) -> None:
    assert cli.fails("showvminfo", "no-such-vm").startswith("pagefusion: error: NOT_FOUND: ")
    assert "no-such-vm" in cli.fails("startvm", "no-such-vm")
    assert cli.fails("showvminfo", "No Such VM").startswith("pagefusion: error: NOT_FOUND: ")
    assert cli.fails("fusion", "scan", "no-such-vm").startswith("pagefusion: error: NOT_FOUND: ")
    line = cli.fails("createvm", "--name", "x-bad", "--source", "no-such-adapter")
    assert line.startswith("pagefusion: error: INVALID_ARGUMENT: ")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus"],
        ["createvm"],
        ["createvm", "--name", "x", "--memory", "lots"],
        ["createvm", "--name", "x", "--page-fusion", "maybe"],
        ["createvm", "--name", "x", "--source", ":opts"],
        ["modifyvm", "x"],
        ["controlvm", "x", "reset"],
        ["fusion"],
        ["fusion", "config", "--mode", "sometimes"],
        ["metrics", "setup", "--period", "-1"],
        ["list", "disks"],
    ],
)
def test_usage_errors_exit_2_with_one_line(cli: Cli, args: list[str]) -> None:
    cli.fails(*args, code=2)


def test_unreachable_server(cli: Cli) -> None:
    result = cli("--server", "127.0.0.1:1", "list", "vms")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "pagefusion: error: UNAVAILABLE: cannot reach pagefusion server at 127.0.0.1:1"
    )
    assert len(result.stderr.splitlines()) == 1


def test_server_from_environment(cli: Cli) -> None:
    # --server wins over PAGEFUSION_SERVER
    result = cli(
        "--server", cli.address, "list", "vms", env=cli.env(PAGEFUSION_SERVER="127.0.0.1:1")
    )
    assert result.returncode == 0, result.stderr
    result = cli("list", "vms", env=cli.env(PAGEFUSION_SERVER="127.0.0.1:1"))
    assert result.returncode == 1
    assert "127.0.0.1:1" in result.stderr


def test_help_works_offline(cli: Cli) -> None:
    result = cli("--help", env=cli.env(PAGEFUSION_SERVER="127.0.0.1:1"))
    assert result.returncode == 0
    for verb in (
        "createvm",
        "modifyvm",
        "startvm",
        "controlvm",
        "unregistervm",
        "list",
        "showvminfo",
        "fusion",
        "metrics",
        "guest-agent",
    ):
        assert verb in result.stdout


def test_module_entry_point(cli: Cli) -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "pagefusion.clients.cli", "list", "vms"],
        capture_output=True,
        text=True,
        env=cli.env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_startvm_shows_a_progress_bar_on_a_terminal(cli: Cli, machine_id: str) -> None:
    import os
    import pty

    cli.ok("createvm", "--name", machine_id, "--source", memory_source())
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [cli.command, "startvm", machine_id],
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.PIPE,
            env=cli.env(),
        )
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=60) == 0
    finally:
        os.close(controller)
    shown = b"".join(chunks).decode()
    # the waiting line, a bar redrawn in place (\r) up to 100% with the elapsed seconds,
    # then the result
    lines = shown.replace("\r\n", "\n").split("\n")
    assert lines[0] == f'Waiting for VM "{machine_id}" to power on...'
    bar = lines[1].split("\r")[-1]
    assert re.fullmatch(r"\[#{30}\] 100% +\d+\.\ds", bar), lines[1]
    assert lines[1].startswith("\r[")
    assert "%..." not in shown  # the percent steps are for logs, not terminals
    assert shown.rstrip().endswith(f'VM "{machine_id}" has been successfully started.')
    cli.ok("controlvm", machine_id, "poweroff")
    cli.ok("unregistervm", machine_id)
