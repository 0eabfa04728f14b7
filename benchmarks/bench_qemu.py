"""Real Linux guests under QEMU, measured like section 1's synthetic ones.

Issue 7 asks for real guests where available: QEMU from Debian's packages
boots a small Linux guest whose RAM sits in /dev/shm. This module

1. builds a small initramfs for the newest kernel in /boot with Debian's
   initramfs-tools (``MODULES=list``: udev, busybox and the init scripts, no
   extra modules; the stock initrd of linux-image-amd64 unpacks to about
   128 MiB and does not fit in a 256 MiB guest);
2. boots N guests (TCG, ``-smp 1``) with their RAM in
   ``-object memory-backend-file,mem-path=/dev/shm/pf-bench-PID-I,share=on``
   until the initramfs shell prompt ``(initramfs)`` shows on the serial
   console (no ``root=`` is given, so Debian's init stops there), with a
   bounded timeout per guest;
3. pauses them (QMP ``stop``) so their RAM is stable;
4. measures pagefusion: a fresh in-process FusionEngine with page fusion on
   starts every guest from its /dev/shm file through the ``shm`` adapter
   (and, for contrast, from the same bytes already in memory);
5. measures KSM with bench_ksm's machinery on the same bytes: a child
   process reads the files into private anonymous MADV_MERGEABLE memory;
6. always (``finally``) quits QEMU (killing it if it does not quit) and
   removes the /dev/shm files and the work directory.

Needs ``qemu-system-x86_64`` (``apt-get install qemu-system-x86``) and a
kernel image (``apt-get install linux-image-amd64``, which also brings
initramfs-tools); without them :func:`unavailable_reason` says why and the
section is skipped. ``python benchmarks/bench_qemu.py`` runs it on its own
and prints a JSON summary.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ksm
from bench_common import PAGE, BufferMemory, MiB, Timer, expected_savings

QEMU_BIN = "qemu-system-x86_64"
SHM = Path("/dev/shm")
BOOT = Path("/boot")
#: What Debian's initramfs prints when it drops to its shell (no root= given).
MARKER = "(initramfs)"
APPEND = "console=ttyS0"
#: Files of ours in /dev/shm: pf-bench-<pid>-<index>.
SHM_PREFIX = "pf-bench-"


# ---------------------------------------------------------------- what is there


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def find_kernel(boot: Path = BOOT) -> tuple[Path, str] | None:
    """The newest readable /boot/vmlinuz-VERSION, as (path, VERSION), or None."""
    kernels = [p for p in boot.glob("vmlinuz-*") if os.access(p, os.R_OK)]
    if not kernels:
        return None
    best = max(kernels, key=lambda p: _natural(p.name))
    return best, best.name[len("vmlinuz-") :]


def unavailable_reason(
    guests: int = 2,
    size: int = 256 * MiB,
    boot: Path = BOOT,
    shm: Path = SHM,
    which: Callable[[str], str | None] = shutil.which,
) -> str | None:
    """None if real guests can be booted here, else why not (shown in the report)."""
    if which(QEMU_BIN) is None:
        return f"{QEMU_BIN} is not installed (`apt-get install qemu-system-x86`)"
    found = find_kernel(boot)
    if found is None:
        return f"no kernel image in {boot} (`apt-get install linux-image-amd64`)"
    _kernel, version = found
    has_mkinitramfs = which("mkinitramfs") is not None
    stock = boot / f"initrd.img-{version}"
    if not has_mkinitramfs and not stock.is_file():
        return (
            f"no initramfs for kernel {version}: neither mkinitramfs (initramfs-tools) nor {stock}"
        )
    if not shm.is_dir():
        return f"{shm} does not exist"
    free = shutil.disk_usage(shm).free
    if free < guests * size + 256 * MiB:
        return (
            f"{shm} has {free // MiB} MiB free; {guests} x {size // MiB} MiB guests need "
            f"{(guests * size + 256 * MiB) // MiB} MiB"
        )
    return None


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        return out.splitlines()[0].replace("QEMU emulator version ", "") if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def make_initrd(version: str, workdir: Path, boot: Path = BOOT) -> tuple[Path, str]:
    """A small initramfs for ``version`` (see the module doc), or the stock one.

    Returns (path, a note for the report).
    """
    stock = boot / f"initrd.img-{version}"
    if shutil.which("mkinitramfs") and Path(f"/lib/modules/{version}").is_dir():
        conf = workdir / "initramfs-tools"
        if Path("/etc/initramfs-tools").is_dir():
            shutil.copytree("/etc/initramfs-tools", conf, symlinks=True)
        else:
            conf.mkdir()
        text = (conf / "initramfs.conf").read_text() if (conf / "initramfs.conf").exists() else ""
        lines = [ln for ln in text.splitlines() if not ln.startswith(("MODULES=", "COMPRESS="))]
        lines += ["MODULES=list", "COMPRESS=zstd"]
        (conf / "initramfs.conf").write_text("\n".join(lines) + "\n")
        (conf / "modules").write_text("")
        out = workdir / f"initrd.img-{version}-small"
        proc = subprocess.run(
            ["mkinitramfs", "-d", str(conf), "-o", str(out), version],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode == 0 and out.is_file():
            return out, (
                f"built with initramfs-tools (`MODULES=list`), "
                f"{out.stat().st_size / MiB:.1f} MiB compressed"
            )
        note = f"mkinitramfs failed ({proc.stderr.strip()[-200:]}); "
    else:
        note = "no mkinitramfs; "
    return stock, note + f"the stock {stock} (may not fit in a small guest's RAM)"


# ---------------------------------------------------------------- one guest


def _pdeathsig() -> Callable[[], None] | None:
    """A preexec_fn that makes the child die with us (Linux prctl), or None."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


class BootError(RuntimeError):
    pass


class QemuGuest:
    """One QEMU process: RAM in /dev/shm, serial console to a file, QMP on a socket."""

    def __init__(
        self,
        index: int,
        size: int,
        kernel: Path,
        initrd: Path,
        workdir: Path,
        qemu: str,
        accel: str = "tcg",
        append: str = APPEND,
    ) -> None:
        self.index = index
        self.size = size
        self.ram = SHM / f"{SHM_PREFIX}{os.getpid()}-{index}"
        self.console = workdir / f"console-{index}.log"
        self.qmp_path = workdir / f"qmp-{index}.sock"
        self.started = time.perf_counter()
        self.booted_after: float | None = None
        self._sock: socket.socket | None = None
        self._io: Any = None
        mib = size // MiB
        self.argv = [
            qemu,
            "-name",
            f"pf-bench-{index}",
            "-accel",
            accel,
            "-smp",
            "1",
            "-m",
            f"{mib}M",
            "-machine",
            "pc,memory-backend=mem",
            "-object",
            f"memory-backend-file,id=mem,size={mib}M,mem-path={self.ram},share=on,merge=off",
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            f"file:{self.console}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            append,
        ]
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_pdeathsig(),
        )

    # -- QMP

    def _connect(self, deadline: float) -> None:
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise BootError(
                    f"guest {self.index}: QEMU exited ({self.proc.returncode}): {self._stderr()}"
                )
            if time.monotonic() > deadline:
                raise BootError(f"guest {self.index}: no QMP socket from QEMU")
            time.sleep(0.05)
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.settimeout(60)
        self._sock.connect(str(self.qmp_path))
        self._io = self._sock.makefile("rw")
        self._io.readline()  # the greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments: object) -> Any:
        if self._io is None:
            self._connect(time.monotonic() + 30)
        self._io.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self._io.flush()
        while True:
            line = self._io.readline()
            if not line:
                raise RuntimeError(f"guest {self.index}: QMP connection closed")
            reply = json.loads(line)
            if "error" in reply:
                raise RuntimeError(f"guest {self.index}: QMP {name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    # -- boot

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 6) -> str:
        text = self.console_text().replace("\x1b", "")
        return " / ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace").strip()[-300:]

    def wait_booted(self, timeout: float, marker: str = MARKER) -> float:
        """Seconds from QEMU's start to ``marker`` on the console; BootError otherwise."""
        deadline = self.started + timeout
        while True:
            text = self.console_text()
            if marker in text:
                self.booted_after = time.perf_counter() - self.started
                return self.booted_after
            if "Initramfs unpacking failed" in text:
                raise BootError(
                    f"guest {self.index}: the initramfs did not fit in "
                    f"{self.size // MiB} MiB of RAM ({self.console_tail(3)})"
                )
            if self.proc.poll() is not None:
                raise BootError(
                    f"guest {self.index}: QEMU exited ({self.proc.returncode}) "
                    f"before the prompt: {self._stderr()} console: "
                    f"{self.console_tail()}"
                )
            if time.perf_counter() > deadline:
                raise BootError(
                    f"guest {self.index}: no {marker!r} prompt within "
                    f"{timeout:.0f} s; console: {self.console_tail()}"
                )
            time.sleep(0.2)

    def pause(self) -> str:
        self.command("stop")
        return str(self.command("query-status").get("status"))

    def close(self) -> None:
        """Quit QEMU (kill it if it does not), remove the RAM file. Safe to call twice."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                if self._io is None:
                    self._connect(time.monotonic() + 2)
                self._io.write(json.dumps({"execute": "quit"}) + "\n")
                self._io.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.ram.unlink(missing_ok=True)


# ---------------------------------------------------------------- the measurement


@dataclass
class RealGuests:
    """What run() measured (or why it stopped), for the report."""

    guests: int
    size: int
    error: str = ""
    kernel: str = ""
    initrd_note: str = ""
    qemu: str = ""
    accel: str = ""
    boot_seconds: list[float] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    #: over all guests: pages, zero pages, distinct non-zero contents (exact)
    pages: int = 0
    zero: int = 0
    distinct: int = 0
    per_guest_nonzero: list[int] = field(default_factory=list)
    pf_shm: dict[str, Any] = field(default_factory=dict)
    pf_mem: dict[str, Any] = field(default_factory=dict)
    #: the user's path: a fresh server each run, StartMachine of all guests over gRPC
    pf_grpc: dict[str, Any] = field(default_factory=dict)
    ksm: list[bench_ksm.KsmResult] = field(default_factory=list)
    ksm_skipped: str = ""
    unchanged: bool | None = None
    cleanup: str = ""


def _pf_start(sources: Sequence[Callable[[], Any]], repeats: int) -> dict[str, Any]:
    """Start every guest in fresh engines ``repeats`` times (median), then once more
    sampling the savings after each batch (the curve)."""
    from pagefusion.server.engine import FusionEngine

    walls, cpus = [], []
    host = None
    for _ in range(repeats):
        gc.collect()
        engine = FusionEngine(hash_seed=5)
        try:
            with Timer() as t:
                for i, src in enumerate(sources):
                    engine.start_machine(f"vm-{i}", src(), page_fusion=True)
            walls.append(t.wall)
            cpus.append(t.cpu)
            host = engine.stats().host
        finally:
            engine.close()
    gc.collect()
    curve: list[tuple[float, int]] = [(0.0, 0)]
    engine = FusionEngine(hash_seed=5)
    try:
        t0 = time.perf_counter()

        def progress(_done: int, _total: int) -> None:
            h = engine.stats().host
            curve.append((time.perf_counter() - t0, h.pages_saved + h.zero_pages))

        for i, src in enumerate(sources):
            engine.start_machine(f"vm-{i}", src(), page_fusion=True, progress=progress)
    finally:
        engine.close()
    assert host is not None
    return {
        "wall": statistics.median(walls),
        "walls": walls,
        "cpu": statistics.median(cpus),
        "host": host,
        "savings": host.pages_saved + host.zero_pages,
        "curve": curve,
    }


def _server_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pf_grpc_cold(paths: Sequence[Path], repeats: int) -> dict[str, Any]:
    """The user's path: a fresh ``pagefusion-server`` subprocess per run, the
    guests created with the ``shm`` adapter on their RAM files, then
    StartMachine of each over gRPC; wall time of the StartMachine calls and
    the server's CPU time (user + system, /proc), median of ``repeats``."""
    import grpc

    from pagefusion.clients.testing import run_server
    from pagefusion.v1 import fusion_pb2, fusion_pb2_grpc, machine_pb2, machine_pb2_grpc

    walls, cpus, saved = [], [], []
    for _ in range(repeats):
        with run_server(allow_dir=SHM) as server, grpc.insecure_channel(server.address) as ch:
            machines = machine_pb2_grpc.MachineServiceStub(ch)
            for i, path in enumerate(paths):
                machine = machine_pb2.Machine(
                    page_fusion_enabled=True,
                    memory_source=machine_pb2.MemorySource(
                        adapter="shm", options={"path": str(path)}
                    ),
                )
                machines.CreateMachine(
                    machine_pb2.CreateMachineRequest(machine_id=f"real{i}", machine=machine)
                )
            c0 = _server_cpu(server.pid)
            t0 = time.perf_counter()
            for i in range(len(paths)):
                machines.StartMachine(
                    machine_pb2.StartMachineRequest(name=f"machines/real{i}"), timeout=600
                )
            walls.append(time.perf_counter() - t0)
            cpus.append(_server_cpu(server.pid) - c0)
            host = fusion_pb2_grpc.FusionServiceStub(ch).GetFusionStats(
                fusion_pb2.GetFusionStatsRequest()
            ).host
            saved.append(host.pages_saved + host.zero_pages)
    return {
        "wall": statistics.median(walls),
        "walls": walls,
        "cpu": statistics.median(cpus),
        "savings": saved[-1],
        "same_savings": len(set(saved)) == 1,
    }


def _load(path: Path) -> np.ndarray:
    """The RAM file's bytes, page aligned as guest RAM is (see adapters.helpers.page_aligned)."""
    from pagefusion.adapters.helpers import page_aligned

    out = page_aligned(path.stat().st_size)
    with open(path, "rb") as f:
        f.readinto(memoryview(out))
    return out.reshape(-1, PAGE)


def run(
    guests: int = 2,
    size: int = 256 * MiB,
    *,
    ksm_configs: Sequence[tuple[str, int, int, float]] = (),
    ksm_skip_reason: str | None = None,
    repeats: int = 3,
    boot_timeout: float = 120.0,
    accel: str = "tcg",
    settle: float = 2.0,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
) -> RealGuests:
    """Boot, pause, measure pagefusion and KSM, clean up (see the module doc).

    ``ksm_configs``: (label, pages_to_scan, sleep_millisecs, timeout) as in
    run_all.Config; ``ksm_skip_reason`` set: no KSM rows, with that reason.
    Errors while booting end up in ``.error``; the QEMU processes and the
    /dev/shm files are gone when this returns, whatever happened.
    """
    from pagefusion.adapters.base import AdapterContext
    from pagefusion.adapters.registry import open_source

    out = RealGuests(guests, size, accel=accel)
    reason = unavailable_reason(guests, size)
    if reason is not None:
        out.error = reason
        return out
    qemu = shutil.which(QEMU_BIN)
    assert qemu is not None
    found = find_kernel()
    assert found is not None
    kernel, version = found
    out.kernel, out.qemu = version, qemu_version(qemu)
    workdir = Path(tempfile.mkdtemp(prefix="pf-bench-qemu-"))
    running: list[QemuGuest] = []
    try:
        log(f"[qemu] building a small initramfs for {version}")
        initrd, out.initrd_note = make_initrd(version, workdir)
        log(
            f"[qemu] booting {guests} x {size // MiB} MiB guests ({accel}), "
            f"timeout {boot_timeout:.0f} s each"
        )
        for i in range(guests):
            running.append(QemuGuest(i, size, kernel, initrd, workdir, qemu, accel=accel))
        try:
            for g in running:
                out.boot_seconds.append(g.wait_booted(boot_timeout))
                log(
                    f"[qemu]   guest {g.index} at the initramfs prompt after {g.booted_after:.1f} s"
                )
        except BootError as exc:
            out.error = f"did not boot: {exc}"
            log(f"[qemu] {out.error}")
            return out
        time.sleep(settle)  # the shell prints its prompt and goes idle
        out.status = [g.pause() for g in running]
        log(f"[qemu] paused: {out.status}")
        paths = [g.ram for g in running]

        snapshot = [_load(p) for p in paths]
        out.pages, out.zero, out.distinct = expected_savings(snapshot)
        out.per_guest_nonzero = [int(s.view(np.uint64).any(axis=1).sum()) for s in snapshot]
        ctx = AdapterContext(machine_id="bench", allowed_paths=(SHM,))

        def shm_source(path: Path) -> Callable[[], Any]:
            return lambda: open_source("shm", {"path": str(path)}, ctx)

        def mem_source(data: np.ndarray) -> Callable[[], Any]:
            from pagefusion.adapters.base import MemoryRange

            return lambda: BufferMemory(data, [MemoryRange(0, data.nbytes)])

        log("[qemu] pagefusion: shm adapter, then bytes in memory")
        out.pf_shm = _pf_start([shm_source(p) for p in paths], repeats)
        out.pf_mem = _pf_start([mem_source(s) for s in snapshot], repeats)
        log("[qemu] pagefusion: a fresh server, StartMachine over gRPC (cold)")
        out.pf_grpc = _pf_grpc_cold(paths, repeats)
        log(
            f"[qemu]   shm {out.pf_shm['wall']:.3f} s, in memory {out.pf_mem['wall']:.3f} s, "
            f"savings {out.pf_shm['savings']} pages (expected {out.pages - out.distinct})"
        )

        if ksm_skip_reason is not None:
            out.ksm_skipped = ksm_skip_reason
        else:
            for label, pts, sleep, timeout in ksm_configs:
                log(f"[qemu] KSM {label} (timeout {timeout:.0f} s)")
                r = bench_ksm.measure(
                    label, [str(p) for p in paths], pts, sleep, timeout, poll=0.02
                )
                log(
                    f"[qemu]   t99={r.t99} cpu99={r.cpu99} final={r.final} "
                    f"plateau={r.plateau} {r.error}"
                )
                out.ksm.append(r)
        out.unchanged = all(
            np.array_equal(s, _load(p)) for s, p in zip(snapshot, paths, strict=True)
        )
        del snapshot
        return out
    finally:
        for g in running:
            try:
                g.close()
            except Exception as exc:  # keep closing the others
                out.cleanup += f"guest {g.index}: {exc}; "
        for g in running:  # the RAM files go whatever happened above
            g.ram.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
        left = [g.index for g in running if g.proc.poll() is None or g.ram.exists()]
        out.cleanup += (
            f"QEMU processes or RAM files left over: {left}"
            if left
            else "QEMU processes ended, /dev/shm files removed"
        )
        log(f"[qemu] {out.cleanup}")


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Real Linux guests under QEMU: pagefusion vs KSM")
    ap.add_argument("--guests", type=int, default=2)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--no-ksm", action="store_true")
    ap.add_argument("--accel", default="tcg")
    args = ap.parse_args()
    configs = [
        ("defaults (100 / 20 ms)", 100, 20, 180.0),
        ("pages_to_scan=5000", 5000, 20, 60.0),
        ("pages_to_scan=30000", 30000, 20, 60.0),
    ]
    skip = "--no-ksm" if args.no_ksm else bench_ksm.ksm_unavailable_reason()
    r = run(
        args.guests, args.mib * MiB, ksm_configs=configs, ksm_skip_reason=skip, accel=args.accel
    )
    summary = {
        k: v for k, v in r.__dict__.items() if k not in ("pf_shm", "pf_mem", "pf_grpc", "ksm")
    }
    for key in ("pf_shm", "pf_mem", "pf_grpc"):
        d = getattr(r, key)
        summary[key] = {k: d[k] for k in ("wall", "walls", "cpu", "savings")} if d else {}
    summary["ksm"] = [
        {
            "label": k.label,
            "t99": k.t99,
            "cpu99": k.cpu99,
            "final": k.final,
            "t_end": k.t_end,
            "cpu_end": k.cpu_end,
            "error": k.error,
        }
        for k in r.ksm
    ]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    _main()
