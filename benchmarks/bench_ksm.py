"""Linux KSM, measured on the same guest bytes pagefusion ingests.

A child process (this file with ``--child``) synthesises the guests into
private anonymous mappings (MAP_PRIVATE | MAP_ANONYMOUS, every page touched,
zero pages included, as a booted guest's RAM is), or copies a real guest's
RAM from its file (bench_qemu: QEMU's /dev/shm memory backend), marks them
MADV_MERGEABLE and waits. The parent switches KSM on with one configuration, polls
/sys/kernel/mm/ksm every ~50 ms and ksmd's CPU time from /proc/<ksmd>/stat,
and stops at the plateau or the timeout. Then the child exits (its memory is
freed at once), KSM is told ``run=2`` (unmerge), then ``run=0``, and the
original ``pages_to_scan`` and ``sleep_millisecs`` are written back: in a
``finally``, so Ctrl-C and SIGTERM restore them too.

Savings = ``pages_sharing`` + ``ksm_zero_pages`` (pages of guest memory that
need no frame of their own), minus what they were before ``run=1``.

Plateau: the savings value has not changed while ``full_scans`` advanced by
two (two complete passes found nothing more), and at least two full scans
have run. The time to full savings is the first sample at 99% of that final
value.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

KSM = Path("/sys/kernel/mm/ksm")
#: The tunables we write (and restore).
TUNABLES = ("pages_to_scan", "sleep_millisecs")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- sysfs and /proc


def ksm_unavailable_reason(root: Path = KSM) -> str | None:
    """None if KSM can be measured here, else why not (shown in the report)."""
    if not root.is_dir():
        return f"{root} does not exist (kernel without CONFIG_KSM)"
    for name in ("run", *TUNABLES):
        path = root / name
        if not os.access(path, os.W_OK):
            return f"{path} is not writable (KSM needs root)"
    try:
        run = (root / "run").read_text().strip()
        (root / "pages_to_scan").write_text((root / "pages_to_scan").read_text())
    except OSError as exc:
        return f"cannot write {root}: {exc}"
    if run != "0":
        return f"KSM is already in use on this host (run={run}); not touching it"
    if find_ksmd() is None:
        return "no ksmd thread found in /proc"
    return None


def read_counter(name: str, root: Path = KSM) -> int:
    try:
        return int((root / name).read_text().split()[0])
    except (OSError, ValueError):
        return 0


def find_ksmd() -> int | None:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                if f.read().strip() == "ksmd":
                    return int(entry.name)
        except OSError:
            continue
    return None


class ProcUsage(NamedTuple):
    """A process's CPU seconds (all threads) and minor page faults, from /proc/<pid>/stat."""

    user: float
    system: float
    faults: int

    @classmethod
    def of(cls, pid: int) -> ProcUsage:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime, stime and minflt: fields 14, 15 and 10 of stat(5)
        return cls(int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, int(fields[7]))


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/<pid>/stat."""
    usage = ProcUsage.of(pid)
    return usage.user + usage.system


class KsmSettings:
    """Saves KSM's tunables on entry; restores them, unmerged and stopped, on exit."""

    def __init__(self, root: Path = KSM) -> None:
        self.root = root
        self.saved: dict[str, str] = {}

    def write(self, name: str, value: int | str) -> None:
        (self.root / name).write_text(f"{value}\n")

    def __enter__(self) -> KsmSettings:
        self.saved = {n: (self.root / n).read_text().strip() for n in ("run", *TUNABLES)}
        return self

    def stop_and_unmerge(self, wait: float = 30.0) -> None:
        """``run=2`` (unmerge every merged page), wait for the counters to drain, ``run=0``."""
        try:
            self.write("run", 2)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (
                read_counter("pages_shared", self.root) or read_counter("pages_sharing", self.root)
            ):
                time.sleep(0.05)
        finally:
            self.write("run", 0)

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_and_unmerge()
        finally:
            for name in TUNABLES:
                with contextlib.suppress(OSError):
                    self.write(name, self.saved[name])
            self.write("run", 0)  # the original run value; anything else refused to measure


# ---------------------------------------------------------------- the measurement


@dataclass
class KsmResult:
    label: str
    pages_to_scan: int
    sleep_millisecs: int
    timeout: float
    #: (seconds since run=1, savings in pages, full_scans, ksmd CPU seconds)
    samples: list[tuple[float, int, int, float]] = field(default_factory=list)
    plateau: bool = False
    final: int = 0
    t99: float | None = None
    cpu99: float | None = None
    t_end: float = 0.0
    cpu_end: float = 0.0
    error: str = ""


def plateau_index(samples: Sequence[tuple[float, int, int, float]], scans: int = 2) -> int | None:
    """Index of the first sample at which the plateau is confirmed, or None.

    The plateau: savings unchanged while ``full_scans`` advanced by ``scans``
    since the value last changed, with at least ``scans`` full scans done and
    savings above zero.
    """
    if not samples:
        return None
    first_scans = samples[0][2]
    last_value, changed_at_scans = samples[0][1], samples[0][2]
    for i, (_t, value, full, _cpu) in enumerate(samples):
        if value != last_value:
            last_value, changed_at_scans = value, full
        if value > 0 and full - changed_at_scans >= scans and full - first_scans >= scans:
            return i
    return None


def time_to_fraction(
    samples: Sequence[tuple[float, int, int, float]], final: int, fraction: float = 0.99
) -> tuple[float, float] | None:
    """(seconds, ksmd CPU seconds) at the first sample with savings >= fraction x final."""
    if final <= 0:
        return None
    goal = fraction * final
    for t, value, _full, cpu in samples:
        if value >= goal:
            return t, cpu
    return None


def _savings(root: Path = KSM) -> int:
    return read_counter("pages_sharing", root) + read_counter("ksm_zero_pages", root)


def measure(
    label: str,
    specs: Sequence[tuple[str, int, int] | str],
    pages_to_scan: int,
    sleep_millisecs: int,
    timeout: float,
    poll: float = 0.05,
) -> KsmResult:
    """One KSM configuration on fresh guest memory in a fresh child process.

    ``specs``: synthetic guests as (profile, size, seed), or paths of files
    holding a guest's RAM (a real guest's /dev/shm file), copied in whole.
    """
    result = KsmResult(label, pages_to_scan, sleep_millisecs, timeout)
    ksmd = find_ksmd()
    assert ksmd is not None
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            json.dumps([s if isinstance(s, str) else list(s) for s in specs]),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with KsmSettings() as ksm:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line.startswith("READY"):
                result.error = f"child failed to load the guests ({line.strip() or 'no output'})"
                return result
            base = _savings()
            ksm.write("pages_to_scan", pages_to_scan)
            ksm.write("sleep_millisecs", sleep_millisecs)
            cpu0 = proc_cpu_seconds(ksmd)
            scans0 = read_counter("full_scans")
            t0 = time.perf_counter()
            ksm.write("run", 1)
            while True:
                time.sleep(poll)
                t = time.perf_counter() - t0
                sample = (
                    t,
                    _savings() - base,
                    read_counter("full_scans") - scans0,
                    proc_cpu_seconds(ksmd) - cpu0,
                )
                result.samples.append(sample)
                if plateau_index(result.samples) is not None:
                    result.plateau = True
                    break
                if t >= timeout:
                    break
            result.t_end, result.cpu_end = result.samples[-1][0], result.samples[-1][3]
            ksm.write("run", 0)  # stop scanning before the child's memory goes away
            result.final = result.samples[-1][1]
            hit = time_to_fraction(result.samples, result.final) if result.plateau else None
            if hit is not None:
                result.t99, result.cpu99 = hit
            child.stdin.close()  # type: ignore[union-attr]
            child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return result


# ---------------------------------------------------------------- the child


def _child(specs: list[list[int | str] | str]) -> None:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import PAGE, GuestSpec, materialize

    maps = []
    for item in specs:
        if isinstance(item, str):  # a file holding a guest's RAM: copy it in whole
            size = os.path.getsize(item)
            m = mmap.mmap(
                -1,
                size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            with open(item, "rb", buffering=0) as f:
                view = memoryview(m)
                done = 0
                while done < size:
                    n = f.readinto(view[done : done + (64 << 20)])
                    if not n:
                        raise SystemExit(f"{item}: short read at {done}")
                    done += n
                view.release()
            m.madvise(mmap.MADV_MERGEABLE)
            maps.append(m)
            continue
        profile, size, seed = item
        spec = GuestSpec(str(profile), int(size), int(seed))
        m = mmap.mmap(
            -1,
            spec.size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        view = np.frombuffer(m, dtype=np.uint8).reshape(-1, PAGE)
        materialize(spec, view)  # touches every page, zero pages included
        del view
        m.madvise(mmap.MADV_MERGEABLE)
        maps.append(m)
    print("READY", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _child(json.loads(sys.argv[2]))
