"""Progress display (pagefusion.clients.progress): VBoxManage's percent steps and a bar."""

from __future__ import annotations

import io
import threading
from typing import Any

import grpc
import pytest

from pagefusion.clients.errors import PageFusionError
from pagefusion.clients.guest_agent import GuestAgent
from pagefusion.clients.progress import (
    BAR_WIDTH,
    PercentProgress,
    ProgressBar,
    progress_for,
    start_with_progress,
)
from pagefusion.v1 import guest_memory_pb2, machine_pb2

STARTING = machine_pb2.Machine.STATE_STARTING
RUNNING = machine_pb2.Machine.STATE_RUNNING
ALL_STEPS = "0%...10%...20%...30%...40%...50%...60%...70%...80%...90%...100%\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_percent_steps_as_vboxmanage_prints_them() -> None:
    out = io.StringIO()
    progress = PercentProgress(out)
    progress.update(0.0)
    assert out.getvalue() == "0%..."
    progress.update(0.05)
    progress.update(0.34)  # skipped steps are all written
    assert out.getvalue() == "0%...10%...20%...30%..."
    progress.update(0.2)  # never backwards
    progress.update(1.0)  # 100% waits for the end of the operation
    assert out.getvalue().endswith("90%...")
    progress.finish()
    progress.finish()
    assert out.getvalue() == ALL_STEPS


def test_percent_steps_fill_up_when_the_end_comes_early() -> None:
    out = io.StringIO()
    progress = PercentProgress(out)
    progress.update(0.0)
    progress.finish()  # a start too quick for any poll still reads as VBoxManage's
    assert out.getvalue() == ALL_STEPS


def test_percent_steps_end_the_line_on_failure() -> None:
    out = io.StringIO()
    progress = PercentProgress(out)
    progress.update(0.0)
    progress.update(0.15)
    progress.abort()
    progress.update(0.9)
    assert out.getvalue() == "0%...10%...\n"


def test_bar_redraws_in_place_and_ends_at_100() -> None:
    out = Terminal()
    now = [10.0]
    bar = ProgressBar(out, "loading", clock=lambda: now[0])
    bar.update(0.0)
    now[0] = 12.5
    bar.update(0.5)
    bar.update(0.25)  # never backwards
    bar.finish()
    frames = out.getvalue().split("\r")[1:]
    half = "#" * (BAR_WIDTH // 2) + "." * (BAR_WIDTH - BAR_WIDTH // 2)
    assert frames == [
        f"loading [{'.' * BAR_WIDTH}]   0%   0.0s",
        f"loading [{half}]  50%   2.5s",
        f"loading [{'#' * BAR_WIDTH}] 100%   2.5s\n",
    ]


def test_a_transient_bar_erases_itself() -> None:
    out = Terminal()
    bar = ProgressBar(out, "x", transient=True)
    bar.update(0.3)
    bar.abort()
    assert out.getvalue().endswith("\r\x1b[K")
    assert "\n" not in out.getvalue()


def test_progress_for_picks_a_bar_only_on_a_terminal() -> None:
    assert isinstance(progress_for(Terminal()), ProgressBar)
    assert isinstance(progress_for(io.StringIO()), PercentProgress)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[float] = []
        self.ended = ""

    def update(self, fraction: float) -> None:
        self.seen.append(fraction)

    def finish(self) -> None:
        self.ended = "finish"

    def abort(self) -> None:
        self.ended = "abort"


class SlowStart:
    """start_machine blocks until get_machine has answered every scripted progress."""

    def __init__(self, progress: list[float], fail: bool = False) -> None:
        self.progress = list(progress)
        self.fail = fail
        self.released = threading.Event()
        self.polls = 0

    def start_machine(self, name: str) -> Any:
        assert self.released.wait(30), "the poller never got through the script"
        if self.fail:
            raise PageFusionError(grpc.StatusCode.FAILED_PRECONDITION, "source failed")
        return machine_pb2.Machine(name=name, state=RUNNING, load_progress=1.0)

    def get_machine(self, name: str) -> Any:
        self.polls += 1
        if self.polls == 2:  # a failed poll is skipped
            raise PageFusionError(grpc.StatusCode.UNAVAILABLE, "blip")
        if not self.progress:
            self.released.set()
            return machine_pb2.Machine(name=name, state=STARTING, load_progress=0.99)
        return machine_pb2.Machine(name=name, state=STARTING, load_progress=self.progress.pop(0))


def test_start_with_progress_shows_what_get_machine_reports() -> None:
    client = SlowStart([0.25, 0.5, 0.75])
    recorder = Recorder()
    machine = start_with_progress(client, "machines/vm", recorder, interval=0.001)
    assert machine.state == RUNNING
    assert recorder.seen[:4] == [0.0, 0.25, 0.5, 0.75]
    assert recorder.ended == "finish"


def test_start_with_progress_aborts_and_raises_on_failure() -> None:
    client = SlowStart([0.5], fail=True)
    recorder = Recorder()
    with pytest.raises(PageFusionError) as info:
        start_with_progress(client, "machines/vm", recorder, interval=0.001)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert recorder.ended == "abort"
    assert 0.5 in recorder.seen


class AgentClient:
    """Just enough of a client for one guest-agent cycle."""

    def __init__(self) -> None:
        self.modules = [
            guest_memory_pb2.SharedModule(module_name=f"m{i}.dll", version="1", base_address=i,
                                          module_size=4096)
            for i in range(4)
        ]

    def get_page_sharing_status(self, name: str) -> bool:
        return True

    def list_guest_modules(self, name: str) -> list[Any]:
        return self.modules

    def register_shared_module(self, name: str, module: Any) -> None:
        pass

    def check_shared_modules(self, name: str) -> Any:
        return guest_memory_pb2.CheckSharedModulesResponse(pages_checked=4, pages_fused=2)


class Log:
    as_json = False

    def __init__(self) -> None:
        self.lines: list[str] = []

    def text(self, text: str) -> None:
        self.lines.append(text)

    def json_line(self, value: Any) -> None:
        pass


def test_guest_agent_shows_its_steps_on_a_terminal_and_erases_them() -> None:
    terminal = Terminal()
    log = Log()
    report = GuestAgent(AgentClient(), "machines/w10", log=log, terminal=terminal).run_cycle()
    assert report.completed and report.pages_fused == 2
    shown = terminal.getvalue()
    assert "w10: registering 4 modules [" in shown
    assert " 75% " in shown  # the bar moved while registering
    assert "w10: checking the pages of 4 modules" in shown
    assert shown.endswith("\r\x1b[K")  # erased: the log line starts clean
    assert "checked 4 pages, fused 2" in log.lines[-1]


def test_guest_agent_without_a_terminal_writes_only_its_log() -> None:
    log = Log()
    GuestAgent(AgentClient(), "machines/w10", log=log).run_cycle()
    assert len(log.lines) == 1
    assert "\r" not in log.lines[0]


class ScanClient:
    def run_scan(self, names: list[str]) -> Any:
        from pagefusion.v1 import fusion_pb2

        return fusion_pb2.RunScanResponse(pages_scanned=10, pages_fused=3)


def test_fusion_scan_says_what_it_does_on_a_terminal_only() -> None:
    import argparse

    from pagefusion.clients import cli

    args = argparse.Namespace(names=["machines/a", "machines/b"])
    terminal = Terminal()
    assert cli.cmd_fusion_scan(ScanClient(), args, cli.Output(as_json=False, stream=terminal)) == 0
    shown = terminal.getvalue()
    assert "\rScanning the live memory of a, b..." in shown
    assert "\r\x1b[KPages scanned:               10\n" in shown  # erased, then the result
    plain = io.StringIO()
    cli.cmd_fusion_scan(ScanClient(), args, cli.Output(as_json=False, stream=plain))
    assert plain.getvalue().startswith("Pages scanned:               10\n")
