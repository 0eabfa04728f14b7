"""The demo the main job runs: similar Windows guests, fused.

Creates (once; the registry persists in ./data) three Windows 10 guests and
one Windows 7 guest from the synthetic-windows adapter, all with page fusion
on, plus a Windows 10 guest with page fusion off for contrast; starts them,
runs a guest-agent cycle (the hint path) for each, and prints what fusion
saves.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from pagefusion.clients.client import PageFusionClient, PageFusionError

MIB = 1 << 20
GUESTS = [
    # id, profile, MiB, page fusion, seed
    ("win10-a", "Windows10_64", 512, True, 1),
    ("win10-b", "Windows10_64", 512, True, 2),
    ("win10-c", "Windows10_64", 512, True, 3),
    ("win7-a", "Windows7_64", 512, True, 4),
    ("win10-nofusion", "Windows10_64", 512, False, 5),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="127.0.0.1:50051")
    args = parser.parse_args()
    client = PageFusionClient(args.server, long_timeout=600)
    client.wait_for_ready(timeout=30)
    print(f"pagefusion demo against {args.server}")
    for machine_id, profile, mib, fusion, seed in GUESTS:
        try:
            client.get_machine(machine_id)
        except PageFusionError:
            client.create_machine(
                machine_id,
                display_name=machine_id,
                memory_size_bytes=mib * MIB,
                os_type=profile,
                page_fusion_enabled=fusion,
                memory_source=("synthetic-windows", {"profile": profile, "seed": str(seed)}),
            )
        machine = client.get_machine(machine_id)
        if machine.state != machine.STATE_RUNNING:
            t = time.perf_counter()
            client.start_machine(machine_id)
            took = time.perf_counter() - t
        else:
            took = 0.0
        hinted = ""
        if fusion:
            # One cycle of the guest agent: register modules, then check.
            for module in client.list_guest_modules(machine_id):
                with contextlib.suppress(PageFusionError):  # registered by an earlier run
                    client.register_shared_module(machine_id, module)
            check = client.check_shared_modules(machine_id)
            hinted = (
                f"; guest agent: {check.pages_checked} module pages checked,"
                f" {check.pages_fused} more fused"
            )
        print(
            f"  started {machine_id:<15} {profile:<13} {mib} MiB in {took:.2f} s"
            f" (page fusion {'on' if fusion else 'off'}{hinted})"
        )

    stats = client.get_fusion_stats()
    host = stats.host
    kib = 4
    print()
    print(f"{'machine':<16}{'guest MiB':>10}{'zero':>9}{'private':>9}{'shared':>9}")
    for m in stats.machines:
        print(
            f"{m.name.split('/')[-1]:<16}{m.guest_pages * kib // 1024:>10}"
            f"{m.zero_pages * kib // 1024:>9}{m.private_pages * kib // 1024:>9}"
            f"{m.shared_pages * kib // 1024:>9}"
        )
    guest = host.guest_pages * kib // 1024
    used = host.frames_used * kib // 1024
    print()
    print(f"guest memory {guest} MiB is held in {used} MiB of host frames:")
    print(f"  zero pages elided  {host.zero_pages * kib // 1024:>6} MiB")
    print(
        f"  pages saved        {host.pages_saved * kib // 1024:>6} MiB "
        f"({host.frames_shared} frames shared)"
    )
    print(
        f"  host memory saved  {(guest - used) * 100 // max(guest, 1)}%"
        f" (identity: {host.guest_pages} guest pages = {host.frames_used} frames used"
        f" + {host.pages_saved} saved + {host.zero_pages} zero)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
