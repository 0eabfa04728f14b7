"""``pagefusion estimate`` against real servers: the figures must be the server's, exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from clients_support import pagefusion_command
from estimate_support import (
    MIB,
    estimate_host,
    machine,
    run_agents,
    server_figures,
    start_all,
    windows,
    write_image,
    write_spec,
)

from pagefusion.clients.estimate import (
    MAX_REFCOUNT,
    EstimateError,
    Options,
    estimate,
    load_specs,
)
from pagefusion.clients.testing import RunningServer, run_server


def fleet(allow: Path) -> list[dict[str, Any]]:
    """Three Windows profiles, raw images and a memory file; fusion on and off; two domains."""
    w10a = windows("w10a", "Windows10_64", 1, 48)
    items = [
        w10a,
        windows("w10b", "Windows10_64", 2, 48),
        windows("xp-a", "WindowsXP", 3, 32, domain="legacy"),
        windows("xp-b", "WindowsXP", 4, 32, domain="legacy"),
        windows("w7-a", "Windows7_64", 5, 32),
        windows("w7-off", "Windows7_64", 6, 32, fusion=False),
        machine("img", "file", {"path": str(write_image(allow / "img.raw", 6000, 7, w10a))}),
        machine("img-off", "file", {"path": str(write_image(allow / "off.raw", 3000, 8))},
                fusion=False),
        machine("live", "shm", {"path": str(write_image(allow / "live.mem", 2048, 9))},
                domain="legacy"),
        machine("mix", "memory", {"size": "24MiB", "pattern": "mixed", "seed": "3"}),
    ]
    return items


def test_local_estimate_equals_server(pagefusion_server: RunningServer,
                                      pagefusion_client: Any, tmp_path: Path) -> None:
    items = fleet(pagefusion_server.allow_dir)
    result = estimate(load_specs([write_spec(tmp_path / "fleet.json", items)]))
    start_all(pagefusion_client, items)
    host, machines = server_figures(pagefusion_client)
    assert estimate_host(result) == host
    assert result["machines"] == machines
    # Something is shared, something is not, and profit is savings minus metadata.
    assert host["pages_saved"] > 0 and host["frames_shared"] > 0
    by_name = {m["name"]: m for m in machines}
    assert by_name["machines/w7-off"]["shared_pages"] == 0
    assert by_name["machines/img"]["shared_pages"] > 0  # borrows pages of w10a
    assert result["host"]["profit_bytes"] == (
        (host["pages_saved"] + host["zero_pages"]) * 4096 - host["metadata_bytes"]
    )


def same(machine_id: str, size: int, **kw: Any) -> dict[str, Any]:
    return machine(machine_id, "memory", {"size": str(size), "pattern": "same"}, **kw)


def test_frame_cap_equals_server(pagefusion_server: RunningServer,
                                 pagefusion_client: Any, tmp_path: Path) -> None:
    """More copies of one page than a frame takes: the engine's 65,535-user rule."""
    full = MAX_REFCOUNT * 4096  # exactly fills one frame, in four batches
    items = [
        same("same-a", full),
        same("same-b", 16384),  # meets a saturated frame
        same("same-c", 100 * MIB, domain="other"),
        same("same-d", 70 * MIB),
        same("same-off", 8 * MIB, fusion=False),
        same("one", 4096),
    ]
    result = estimate(load_specs([write_spec(tmp_path / "same.json", items)]))
    start_all(pagefusion_client, items)
    host, machines = server_figures(pagefusion_client)
    assert estimate_host(result) == host
    assert result["machines"] == machines
    assert host["frames_used"] > 2 + 2048  # the cap split the content across frames
    assert host["frames_used"] - 2048 < host["guest_pages"] // MAX_REFCOUNT + 4


def test_hint_policy_equals_server_in_hints_mode(tmp_path: Path) -> None:
    items = [
        windows("w10a", "Windows10_64", 11, 32),
        windows("w10b", "Windows10_64", 12, 32),
        windows("xp", "WindowsXP", 13, 32),
        windows("xp-other", "WindowsXP", 14, 32, domain="other"),
        windows("xp-off", "WindowsXP", 15, 32, fusion=False),
        windows("w7", "Windows7_64", 16, 32),
        windows("w7b", "Windows7_64", 17, 32),
    ]
    result = estimate(load_specs([write_spec(tmp_path / "hints.json", items)]))
    with run_server() as server, server.client() as client:
        client.update_fusion_config(mode="hints")
        start_all(client, items)
        run_agents(client, items)
        host, _ = server_figures(client)
    hints = result["policies"]["hints_only"]
    assert {key: hints[key] for key in host} == host
    assert 0 < hints["pages_saved"] < result["policies"]["one_domain"]["pages_saved"]


def test_policies_and_sharing_are_consistent(tmp_path: Path) -> None:
    items = [
        windows("a", "Windows10_64", 1, 32),
        windows("b", "Windows10_64", 2, 32, domain="two"),
        windows("c", "WindowsXP", 3, 32, fusion=False),
    ]
    result = estimate(load_specs([write_spec(tmp_path / "p.json", items)]))
    policies = result["policies"]
    assert policies["configured"]["pages_saved"] == result["host"]["pages_saved"]
    zero = policies["zero_pages_only"]
    assert zero["pages_saved"] == 0 and zero["zero_pages"] == result["host"]["zero_pages"]
    assert policies["one_domain"]["pages_saved"] > policies["configured"]["pages_saved"]
    matrix = result["sharing"]["pages"]
    assert matrix == [list(row) for row in zip(*matrix, strict=True)]  # symmetric
    assert matrix[0][1] > 1000  # same build, different seeds: most images in common
    # One domain saves exactly the duplicates inside each machine plus what pairs share
    # (three machines: no page is common to all three here beyond what the matrix says).
    one_alone = sum(matrix[i][i] for i in range(3))
    assert policies["one_domain"]["pages_saved"] >= one_alone + matrix[0][1]


def test_cli_json_plot_and_quiet_stderr(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.json", [windows("a", "Windows10_64", 1, 16),
                                            windows("b", "Windows10_64", 2, 16)])
    plot = tmp_path / "sharing.png"
    done = subprocess.run([pagefusion_command(), "estimate", "--json", "--plot", str(plot),
                           str(spec)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no progress bar
    result = json.loads(done.stdout)
    assert [m["name"] for m in result["machines"]] == ["machines/a", "machines/b"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = subprocess.run([pagefusion_command(), "estimate", str(spec)], capture_output=True,
                          text=True, timeout=300)
    assert text.returncode == 0 and "frames_used:" in text.stdout and "machines/a" in text.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{\"machine_id\": \"Bad_Id\", \"machine\": {\"memory_source\": {\"adapter\": "
         "\"memory\"}}}]", "not a valid id"),
        ("[{\"machine_id\": \"a\", \"machine\": {\"memory_source\": {\"adapter\": \"nope\"}}}]",
         "unknown adapter 'nope'"),
        ("[{\"machine_id\": \"a\", \"machine\": {\"colour\": 1}}]", "colour"),
        ("not json", "is not JSON"),
        ("[{\"machine_id\": \"a\", \"machine\": {\"memory_source\": {\"adapter\": \"file\", "
         "\"options\": {\"path\": \"/nonexistent/x.raw\"}}}}]", "does not exist"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, content: str, message: str) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(content)
    done = subprocess.run([pagefusion_command(), "estimate", str(spec)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert done.stderr.startswith("pagefusion: error: ")


def test_duplicate_ids_and_partial_placement_flags(tmp_path: Path) -> None:
    item = machine("a", "memory", {"size": "1MiB"})
    with pytest.raises(EstimateError, match="appears twice"):
        load_specs([write_spec(tmp_path / "d.json", [item, item])])
    spec = write_spec(tmp_path / "one.json", [item])
    done = subprocess.run([pagefusion_command(), "estimate", "--hosts", "2", str(spec)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--host-memory" in done.stderr
    done = subprocess.run([pagefusion_command(), "estimate", "--hosts", "0", "--host-memory",
                           "1G", str(spec)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "at least 1" in done.stderr
    assert estimate(load_specs([spec]), Options())["host"]["guest_pages"] == 256
