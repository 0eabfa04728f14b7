"""Smoke test of the benchmark harness (benchmarks/run_all.py --quick).

Runs the quick harness in a subprocess without touching the host's KSM and
checks that the report was written with every non-KSM section; the KSM
helpers are tested against a fake sysfs directory instead.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        alias = f"_bench_{name}"
        spec = importlib.util.spec_from_file_location(alias, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.timeout(120)
def test_quick_run_writes_the_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--no-ksm", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=110, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    for heading in ("## Targets (issue 7)", "## 1. Time to full savings against Linux KSM",
                    "## 1b. Real Linux guests under QEMU",
                    "## 2. Ingest throughput", "## 3. Metadata per guest page",
                    "## 4. Overcommit", "## 5. Copy-on-write latency and RPC throughput",
                    "## 6. Hint path against content path"):
        assert heading in report, heading
    # KSM was skipped on purpose, and the report says so; everything else was measured.
    assert "KSM rows skipped: turned off with --no-ksm" in report
    # The quick run never boots QEMU (CI's smoke run), and says so.
    assert "**Skipped: not run in --quick mode" in report
    assert "[qemu] skipped: not run in --quick mode" in proc.stdout
    assert "Not measured" not in report, report
    assert "| ReadGuestMemory | 50 |" in report
    assert "| pagefusion ingest (fresh engine, fusion on) |" in report
    assert "| write to a SHARED page |" in report
    assert "share of content's savings" in report
    # The growth table carries the server's own work per row (issue 11's profile).
    assert "| page faults per GiB | system time per fault |" in report
    assert "The server's work per GiB started (medians, from /proc): user CPU" in report
    for metric in ("Ingest >= 1/2 of hash-only throughput", "Metadata <= 8 bytes per guest page",
                   "Copy-on-write write p50 <= 10 us in-process"):
        assert metric in report
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("savings_over_time.png", "overcommit_rss.png", "rpc_throughput.png",
                    "hints_vs_content.png"):
            assert (tmp_path / "figures" / png).stat().st_size > 1000, png
    else:
        assert "matplotlib is not installed" in report


def test_growth_profile_blames_faults_only_when_the_numbers_show_it() -> None:
    userpath = _load("bench_userpath")
    row = userpath.GrowthRow

    def claims(rows: list) -> bool:
        return "not more work by pagefusion" in userpath.growth_profile(rows)

    flat_user = [row(1, 0.80, 1e-3, 0.80, 0.30, 150_000), row(8, 1.20, 1e-3, 0.85, 1.00, 100_000)]
    assert claims(flat_user)
    assert "2.0 to 10.0 us" in userpath.growth_profile(flat_user)
    # Wall time flat: nothing to explain.
    assert not claims([row(1, 0.80, 1e-3, 0.80, 0.30, 150_000),
                       row(8, 0.85, 1e-3, 0.85, 1.00, 100_000)])
    # User CPU grew with the wall time: that is pagefusion's own work.
    assert not claims([row(1, 0.80, 1e-3, 0.80, 0.30, 150_000),
                       row(8, 1.20, 1e-3, 1.10, 1.00, 100_000)])
    # Each fault cost the same: the rise is not the faults'.
    assert not claims([row(1, 0.80, 1e-3, 0.80, 0.30, 150_000),
                       row(8, 1.20, 1e-3, 0.85, 0.25, 100_000)])
    # Medians are taken field by field over the runs.
    runs = [[row(1, s, 1e-3, u, 0.3, 1000)] for s, u in ((1.0, 0.7), (3.0, 0.9), (2.0, 0.8))]
    assert userpath.median_rows(runs) == [row(1, 2.0, 1e-3, 0.8, 0.3, 1000)]


def test_ksm_plateau_and_time_to_99_percent() -> None:
    ksm = _load("bench_ksm")
    # (t, savings, full_scans, cpu): merges during the second pass, then flat for two more.
    samples = [(0.1, 0, 0, 0.0), (0.2, 0, 1, 0.1), (0.3, 500, 1, 0.2), (0.4, 990, 2, 0.3),
               (0.5, 1000, 2, 0.4), (0.6, 1000, 3, 0.5), (0.7, 1000, 4, 0.6)]
    assert ksm.plateau_index(samples) == 6
    assert ksm.plateau_index(samples[:6]) is None
    assert ksm.time_to_fraction(samples, 1000) == (0.4, 0.3)
    assert ksm.time_to_fraction(samples, 0) is None


def test_ksm_settings_restored_on_error(tmp_path: Path) -> None:
    ksm = _load("bench_ksm")
    for name, value in (("run", "0"), ("pages_to_scan", "100"), ("sleep_millisecs", "20"),
                        ("pages_shared", "0"), ("pages_sharing", "0")):
        (tmp_path / name).write_text(value + "\n")
    with pytest.raises(KeyboardInterrupt), ksm.KsmSettings(tmp_path) as settings:
        settings.write("pages_to_scan", 30000)
        settings.write("sleep_millisecs", 10)
        settings.write("run", 1)
        raise KeyboardInterrupt
    assert (tmp_path / "run").read_text().strip() == "0"
    assert (tmp_path / "pages_to_scan").read_text().strip() == "100"
    assert (tmp_path / "sleep_millisecs").read_text().strip() == "20"
    (tmp_path / "run").write_text("1\n")
    assert "already in use" in ksm.ksm_unavailable_reason(tmp_path)


def test_qemu_skips_with_a_reason(tmp_path: Path) -> None:
    qemu = _load("bench_qemu")
    boot, shm = tmp_path / "boot", tmp_path / "shm"
    boot.mkdir()
    shm.mkdir()
    found = {"qemu-system-x86_64": "/usr/bin/qemu-system-x86_64", "mkinitramfs": "/x"}
    reason = qemu.unavailable_reason(boot=boot, shm=shm, which=lambda name: None)
    assert "qemu-system-x86_64 is not installed" in reason
    reason = qemu.unavailable_reason(boot=boot, shm=shm, which=found.get)
    assert "linux-image-amd64" in reason
    for version in ("6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64"):
        (boot / f"vmlinuz-{version}").write_bytes(b"k")
    assert qemu.find_kernel(boot) == (boot / "vmlinuz-6.1.0-56-amd64", "6.1.0-56-amd64")
    assert qemu.unavailable_reason(boot=boot, shm=shm, which=found.get) is None
    reason = qemu.unavailable_reason(boot=boot, shm=shm, which={"qemu-system-x86_64": "q"}.get)
    assert "no initramfs for kernel 6.1.0-56-amd64" in reason
    reason = qemu.unavailable_reason(boot=boot, shm=tmp_path / "none", which=found.get)
    assert "does not exist" in reason
    reason = qemu.unavailable_reason(1 << 50, boot=boot, shm=shm, which=found.get)
    assert "MiB free" in reason


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm").is_dir(), reason="kernel without KSM")
@pytest.mark.timeout(60)
def test_ksm_child_copies_a_ram_file(tmp_path: Path) -> None:
    """bench_ksm's child loads a real guest's RAM file (no root needed: KSM stays off)."""
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(8192) + b"\x01" * 4096)
    child = subprocess.Popen(
        [sys.executable, str(BENCH / "bench_ksm.py"), "--child", f'["{ram}"]'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "READY"
        child.stdin.close()
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
