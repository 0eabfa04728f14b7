"""``estimate --hosts N --host-memory BYTES``: real servers per host find the predicted frames."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from clients_support import pagefusion_command
from estimate_support import server_figures, start_all, windows, write_spec

from pagefusion.clients.estimate import EstimateError, Options, estimate, load_specs
from pagefusion.clients.testing import run_server


def on_servers(items: list[dict[str, Any]], hosts: list[dict[str, Any]],
               host_memory: int | None) -> list[dict[str, int]]:
    """Start each host's machines (in SPEC order) on a fresh server capped at the host's memory."""
    by_name = {"machines/" + item["machine_id"]: item for item in items}
    order = [f"machines/{item['machine_id']}" for item in items]
    found = []
    for host in hosts:
        members = sorted(host["machines"], key=order.index)
        cap = ["--max-pool-bytes", str(host_memory)] if host_memory else []
        with run_server(extra_args=cap) as server, \
                server.client() as client:
            start_all(client, [by_name[name] for name in members])
            figures, _ = server_figures(client)
        found.append({"frames_used": figures["frames_used"],
                      "pages_saved": figures["pages_saved"]})
    return found


def test_placement_is_exact_on_real_servers_and_beats_round_robin(tmp_path: Path) -> None:
    # Round robin pairs each Windows 10 guest with an XP guest: little in common.
    items = [
        windows("w10a", "Windows10_64", 1, 32),
        windows("w10b", "Windows10_64", 2, 32),
        windows("xp-a", "WindowsXP", 3, 32),
        windows("xp-b", "WindowsXP", 4, 32),
    ]
    spec = write_spec(tmp_path / "fleet.json", items)
    plain = estimate(load_specs([spec]))
    distinct = plain["sharing"]["distinct_pages"]
    common = plain["sharing"]["pages"]
    # Room for the better pair on each host, not for three machines.
    best_pair = max(distinct[0] + distinct[1] - common[0][1],
                    distinct[2] + distinct[3] - common[2][3])
    host_memory = (best_pair + 64) * 4096
    assert min(distinct) * 3 > best_pair + 64

    done = subprocess.run(
        [pagefusion_command(), "estimate", "--json", "--hosts", "2", "--host-memory",
         str(host_memory), str(spec)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    placement = json.loads(done.stdout)["placement"]
    hosts = placement["hosts"]
    assert placement["fits"] and len(hosts) == 2
    assert sorted(sorted(h["machines"]) for h in hosts) == [
        ["machines/w10a", "machines/w10b"], ["machines/xp-a", "machines/xp-b"]]
    assert placement["frames_used"] < placement["round_robin"]["frames_used"]
    assert all(h["frames_used"] * 4096 <= host_memory for h in hosts)

    predicted = [{"frames_used": h["frames_used"], "pages_saved": h["pages_saved"]} for h in hosts]
    assert on_servers(items, hosts, host_memory) == predicted
    rr = placement["round_robin"]["hosts"]
    assert on_servers(items, rr, None) == [
        {"frames_used": h["frames_used"], "pages_saved": h["pages_saved"]} for h in rr]


def test_placement_refuses_what_fits_nowhere(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "big.json", [windows("w10a", "Windows10_64", 1, 32)])
    done = subprocess.run(
        [pagefusion_command(), "estimate", "--hosts", "2", "--host-memory", "1MiB", str(spec)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "fits on no host" in done.stderr and done.stderr.count("\n") == 1
    with pytest.raises(EstimateError, match="fits on no host"):
        estimate(load_specs([spec]), Options(hosts=1, host_memory=4096))
