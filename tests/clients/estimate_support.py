"""Helpers of the estimate tests: SPEC files, and the same machines on real servers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict, ParseDict

from pagefusion.adapters.base import AdapterContext
from pagefusion.adapters.registry import open_source
from pagefusion.clients.guest_agent import GuestAgent
from pagefusion.v1 import machine_pb2

MIB = 1 << 20
HOST_FIELDS = (
    "guest_pages", "zero_pages", "private_pages", "shared_pages", "frames_used",
    "frames_shared", "pages_saved", "metadata_bytes",
)
MACHINE_FIELDS = ("name", "guest_pages", "zero_pages", "private_pages", "shared_pages")


def machine(
    machine_id: str,
    adapter: str,
    options: dict[str, str],
    *,
    fusion: bool = True,
    domain: str = "",
    os_type: str = "",
    size: int = 0,
) -> dict[str, Any]:
    """One CreateMachineRequest as a SPEC file holds it (protos' field names)."""
    body: dict[str, Any] = {
        "page_fusion_enabled": fusion,
        "memory_source": {"adapter": adapter, "options": options},
    }
    if domain:
        body["fusion_domain"] = domain
    if os_type:
        body["os_type"] = os_type
    if size:
        body["memory_size_bytes"] = str(size)
    return {"machine_id": machine_id, "machine": body}


def windows(machine_id: str, profile: str, seed: int, size_mb: int, **kw: Any) -> dict[str, Any]:
    return machine(machine_id, "synthetic-windows", {"seed": str(seed)}, os_type=profile,
                   size=size_mb * MIB, **kw)


def write_spec(path: Path, items: Sequence[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(list(items)))
    return path


def write_image(path: Path, pages: int, seed: int, borrow: dict[str, Any] | None = None) -> Path:
    """A raw image: zero pages, random pages, repeats, and (``borrow``) a guest's pages."""
    rng = np.random.default_rng(seed)
    data = np.zeros((pages, 4096), dtype=np.uint8)
    kind = rng.integers(0, 4, size=pages)
    data[kind == 1] = rng.integers(0, 256, size=(int(np.count_nonzero(kind == 1)), 4096),
                                   dtype=np.uint8)
    data[kind == 2] = 0x5A  # one content repeated
    if borrow is not None:
        body = borrow["machine"]
        memory = open_source(
            "synthetic-windows", body["memory_source"]["options"],
            AdapterContext(borrow["machine_id"], body.get("os_type", ""),
                           int(body.get("memory_size_bytes", 0))),
        )
        try:
            take = min(pages // 4, memory.ranges()[0].pages)
            guest = np.frombuffer(memory.read(0, take * 4096), dtype=np.uint8).reshape(-1, 4096)
            data[pages - take :] = guest
        finally:
            memory.close()
    path.write_bytes(data.tobytes())
    return path


def start_all(client: Any, items: Sequence[dict[str, Any]]) -> None:
    """Create and start the machines in order, as ``pagefusion startvm`` would."""
    for item in items:
        request = ParseDict(item, machine_pb2.CreateMachineRequest())
        client.create_machine(request.machine_id, machine=request.machine)
        client.start_machine(request.machine_id, timeout=600)


def run_agents(client: Any, items: Sequence[dict[str, Any]]) -> None:
    """One guest-agent cycle per machine, in order."""

    class Quiet:
        as_json = False

        def text(self, text: str) -> None:
            pass

        def json_line(self, value: Any) -> None:
            pass

    for item in items:
        GuestAgent(client, "machines/" + item["machine_id"], log=Quiet()).run_cycle()


def server_figures(client: Any) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """GetFusionStats as (host figures, machine rows) in the estimate's shape."""
    stats = MessageToDict(client.get_fusion_stats(), preserving_proto_field_name=True,
                          always_print_fields_with_no_presence=True)
    host = {key: int(stats["host"][key]) for key in HOST_FIELDS}
    machines = [
        {key: (row[key] if key == "name" else int(row[key])) for key in MACHINE_FIELDS}
        for row in stats["machines"]
    ]
    return host, machines


def estimate_host(result: dict[str, Any]) -> dict[str, int]:
    return {key: result["host"][key] for key in HOST_FIELDS}
