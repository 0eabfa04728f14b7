"""The estimate on real QEMU guests' images (skipped without qemu-system-x86_64).

Two SeaBIOS guests, paused: an ELF core and a kdump-compressed core of the
first (QEMU's ``dump-guest-memory``), a migration stream of the second, and
the first's live RAM file through ``shm``. The estimate of those four
machines must be what a real server shows once they run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from estimate_support import estimate_host, machine, server_figures, start_all, write_spec
from qemu_support import QEMU, SHM, MiB, guest, migrate_to_file

from pagefusion.clients.estimate import estimate, load_specs
from pagefusion.clients.testing import run_server

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def test_estimate_of_qemu_images_equals_server(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with guest(tmp_path / "a", 128 * MiB) as (first, ram), \
            guest(tmp_path / "b", 128 * MiB) as (second, _):
        first.command("stop")
        second.command("stop")
        first.command("dump-guest-memory", paging=False, protocol=f"file:{images / 'a.elf'}")
        first.command("dump-guest-memory", paging=False, protocol=f"file:{images / 'a.kdump'}",
                      format="kdump-zlib")
        second.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        migrate_to_file(second, images / "b.qevm")
        items = [
            machine("a-elf", "file", {"path": str(images / "a.elf")}),
            machine("a-kdump", "file", {"path": str(images / "a.kdump")}, domain="other"),
            machine("b-stream", "file", {"path": str(images / "b.qevm")}),
            machine("a-live", "shm", {"path": str(ram)}, fusion=False),
        ]
        result = estimate(load_specs([write_spec(tmp_path / "qemu.json", items)]))
        with run_server(allow_dir=images, extra_args=["--allow-path", str(SHM)]) as server, \
                server.client() as client:
            start_all(client, items)
            host, machines = server_figures(client)
    assert estimate_host(result) == host
    assert result["machines"] == machines
    assert host["zero_pages"] > 0 and host["pages_saved"] > 0
    # The ELF core and the stream of two guests booted alike share their firmware pages.
    names = result["sharing"]["machines"]
    assert result["sharing"]["pages"][names.index("machines/a-elf")][
        names.index("machines/b-stream")] > 0
