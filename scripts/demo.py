"""The demo the main job runs: similar Windows guests, fused.

1. Creates (once; the registry persists in ./data) three Windows 10 guests
   and one Windows 7 guest from the synthetic-windows adapter, all with page
   fusion on, plus a Windows 10 guest with page fusion off for contrast, and
   starts them: content fusion shares their identical pages while they load.
2. Runs one guest-agent cycle (VirtualBox's hint path) for each fused guest.
3. Prints what fusion saves: per machine, for the host, and the profit
   (KSM's general_profit: savings minus the engine's own metadata).
4. Shows what the hint path does on its own (fusion mode ``hints``, as
   VirtualBox): two more Windows 10 guests in a fusion domain of their own
   share nothing but zero pages until their guest agent's check, which then
   fuses their module pages. The server's fusion mode is restored after.
5. Asks for VerifyFusion, an independent recount of all the sharing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from pagefusion.clients.client import PageFusionClient, PageFusionError
from pagefusion.clients.guest_agent import CycleReport, GuestAgent
from pagefusion.clients.progress import ProgressBar, start_with_progress

MIB = 1 << 20
PAGE = 4096
GUESTS = [
    # id, profile, MiB, page fusion, seed
    ("win10-a", "Windows10_64", 512, True, 1),
    ("win10-b", "Windows10_64", 512, True, 2),
    ("win10-c", "Windows10_64", 512, True, 3),
    ("win7-a", "Windows7_64", 512, True, 4),
    ("win10-nofusion", "Windows10_64", 512, False, 5),
]
#: Step 4: the same profile and size as win10-a/b, in their own fusion domain.
HINT_DOMAIN = "hints-demo"
HINT_GUESTS = [("hint-a", "Windows10_64", 512, True, 11), ("hint-b", "Windows10_64", 512, True, 12)]


def mib(pages: int) -> int:
    return pages * PAGE // MIB


class _Quiet:
    """The guest agent's log, kept: the demo prints its own summary."""

    as_json = False

    def text(self, text: str) -> None:
        pass

    def json_line(self, value: Any) -> None:
        pass


def ensure(client: PageFusionClient, guest: tuple[str, str, int, bool, int], domain: str) -> str:
    """Create the machine unless it exists; 'created' or 'exists'."""
    machine_id, profile, size, fusion, seed = guest
    try:
        client.get_machine(machine_id)
        return "exists"
    except PageFusionError:
        client.create_machine(
            machine_id,
            display_name=machine_id,
            memory_size_bytes=size * MIB,
            os_type=profile,
            page_fusion_enabled=fusion,
            fusion_domain=domain,
            memory_source=("synthetic-windows", {"profile": profile, "seed": str(seed)}),
        )
        return "created"


def start(client: PageFusionClient, machine_id: str) -> float:
    """Start the machine (a bar on a terminal); seconds it took, 0 if it was running."""
    machine = client.get_machine(machine_id)
    if machine.state == machine.STATE_RUNNING:
        return 0.0
    t = time.perf_counter()
    if sys.stdout.isatty():
        start_with_progress(
            client, machine_id, ProgressBar(sys.stdout, f"  loading {machine_id}", transient=True)
        )
    else:
        client.start_machine(machine_id)
    return time.perf_counter() - t


def agent_cycle(client: PageFusionClient, machine_id: str) -> CycleReport:
    report = GuestAgent(client, f"machines/{machine_id}", log=_Quiet()).run_cycle()
    if not report.completed:
        raise SystemExit(f"guest agent of {machine_id} failed: {report.errors}")
    return report


@contextlib.contextmanager
def fusion_mode(client: PageFusionClient, mode: str) -> Iterator[None]:
    """The server's fusion mode set to ``mode`` for a while, then set back."""
    previous = client.get_fusion_config().mode
    client.update_fusion_config(mode=mode)
    try:
        yield
    finally:
        client.update_fusion_config(mode=previous)


def shared_mib(client: PageFusionClient, machine_id: str) -> int:
    for m in client.get_fusion_stats().machines:
        if m.name == f"machines/{machine_id}":
            return mib(m.shared_pages)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="127.0.0.1:50051")
    args = parser.parse_args()
    client = PageFusionClient(args.server, long_timeout=600)
    client.wait_for_ready(timeout=30)
    print(f"pagefusion demo against {args.server}")

    print()
    print("1. Five synthetic Windows guests. Content fusion shares their identical pages")
    print("   while they load, so StartMachine returns with the savings made:")
    for guest in GUESTS:
        machine_id, profile, size, fusion, _ = guest
        how = ensure(client, guest, "default")
        took = start(client, machine_id)
        when = f"started in {took:.2f} s" if took else "already running"
        print(f"   {machine_id:<15} {profile:<13} {size} MiB  page fusion"
              f" {'on ' if fusion else 'off'}  {how}, {when}")

    print()
    print("2. A guest-agent cycle for each fused guest (VirtualBox's hint path: register")
    print("   the guest's modules, then ask the host to fuse their pages by position):")
    for machine_id, _, _, fusion, _ in GUESTS:
        if fusion:
            report = agent_cycle(client, machine_id)
            print(f"   {machine_id:<15} {report.modules} modules, {report.pages_checked} module"
                  f" pages checked, {report.pages_fused} newly fused")
    print("   0 newly fused is expected in the default mode (all): content fusion already")
    print("   shared every identical module page while the guests loaded, so the check finds")
    print("   them shared and has nothing left to fuse. Step 4 shows the hint path alone.")

    stats = client.get_fusion_stats()
    host = stats.host
    print()
    print("3. What fusion saves (MiB):")
    print(f"   {'machine':<16}{'guest':>7}{'zero':>7}{'private':>9}{'shared':>8}")
    for m in stats.machines:
        print(f"   {m.name.split('/')[-1]:<16}{mib(m.guest_pages):>7}{mib(m.zero_pages):>7}"
              f"{mib(m.private_pages):>9}{mib(m.shared_pages):>8}")
    guest, used = mib(host.guest_pages), mib(host.frames_used)
    print(f"   {guest} MiB of guest memory is held in {used} MiB of host frames"
          f" ({(guest - used) * 100 // max(guest, 1)}% saved):")
    print(f"     zero pages elided  {mib(host.zero_pages):>6} MiB")
    print(f"     pages saved        {mib(host.pages_saved):>6} MiB"
          f" ({host.frames_shared} frames shared)")
    print(f"     engine metadata    {host.metadata_bytes // MIB:>6} MiB")
    print(f"     profit             {host.profit_bytes // MIB:>6} MiB"
          " (zero + saved - metadata: KSM's general_profit, RAM/VMM/Profit)")
    print(f"   identity: {host.guest_pages} guest pages = {host.frames_used} frames used"
          f" + {host.pages_saved} saved + {host.zero_pages} zero")

    content_shared = shared_mib(client, "win10-b")
    print()
    print("4. The hint path alone (fusion mode hints, VirtualBox's behaviour): two more")
    print(f'   Windows 10 guests of 512 MiB, in fusion domain "{HINT_DOMAIN}":')
    for guest in HINT_GUESTS:
        ensure(client, guest, HINT_DOMAIN)
        with contextlib.suppress(PageFusionError):  # left running by an earlier demo
            client.stop_machine(guest[0])
    with fusion_mode(client, "hints"):
        for machine_id, *_ in HINT_GUESTS:
            start(client, machine_id)
        before = shared_mib(client, "hint-b")
        reports = [agent_cycle(client, machine_id) for machine_id, *_ in HINT_GUESTS]
    after = shared_mib(client, "hint-b")
    fused = sum(r.pages_fused for r in reports)
    print(f"   started:                {before:>4} MiB of hint-b shared (zero pages elided only)")
    print(f"   after the guest agents: {after:>4} MiB of hint-b shared"
          f" ({fused} module pages fused by position)")
    print(f"   content fusion, step 1: {content_shared:>4} MiB of win10-b shared"
          " (module pages and any other identical page)")
    print()
    consistent, line = _verify(client)
    print(line)
    return 0 if consistent else 1


def _verify(client: PageFusionClient) -> tuple[bool, str]:
    """VerifyFusion's verdict, and a line saying it (what `pagefusion fusion verify` prints)."""
    result = client.verify_fusion()
    verdict = "consistent" if result.consistent else f"INCONSISTENT: {list(result.problems)}"
    return result.consistent, (
        f"5. fusion verify, an independent recount: {verdict} ({result.pages_checked}"
        f" guest pages, {result.frames_checked} frames)"
    )


if __name__ == "__main__":
    sys.exit(main())
