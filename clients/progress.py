"""Progress of long operations, shown the way VBoxManage shows it.

VBoxManage prints ``0%...10%...20%...`` up to ``100%`` on one line, a step at
a time, which reads well in a log and parses easily. On a terminal we draw a
bar instead, redrawn in place. Operations whose progress the server does not
report (a scan, a hint-path check) get a :class:`Spinner` on a terminal
only, so what a script reads stays unchanged.

- :func:`progress_for` picks :class:`ProgressBar` or :class:`PercentProgress`.
- :func:`start_with_progress` runs ``StartMachine`` and polls ``GetMachine``
  (``Machine.load_progress``) while it runs.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, Protocol

#: How often a start's progress is polled (seconds).
POLL_INTERVAL = 0.2
BAR_WIDTH = 30
_STARTING = 2  # Machine.STATE_STARTING; avoids importing the protos for one constant


class Progress(Protocol):
    """Something that shows how far an operation got."""

    def update(self, fraction: float) -> None:
        """Show ``fraction`` (0 to 1) done; never goes backwards."""

    def finish(self) -> None:
        """The operation succeeded: show 100% and end the line."""

    def abort(self) -> None:
        """The operation failed or was interrupted: end the line as it stands."""


class PercentProgress:
    """VBoxManage's ``0%...10%...20%...100%``: one step per further 10%."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._shown = -1  # tens of percent written so far
        self._ended = False

    def update(self, fraction: float) -> None:
        tens = min(int(max(fraction, 0.0) * 10), 10)
        if self._ended or tens <= self._shown:
            return
        if tens == 10:  # 100% only once the operation is over
            tens = 9
        steps = "".join(f"{10 * t}%..." for t in range(self._shown + 1, tens + 1))
        self._shown = max(self._shown, tens)
        if steps:
            self._stream.write(steps)
            self._stream.flush()

    def finish(self) -> None:
        if self._ended:
            return
        self.update(0.9)
        self._stream.write("100%\n")
        self._stream.flush()
        self._ended = True

    def abort(self) -> None:
        if not self._ended:
            if self._shown >= 0:
                self._stream.write("\n")
                self._stream.flush()
            self._ended = True


class ProgressBar:
    """``label [#######.......]  45%``, redrawn in place on a terminal.

    Args:
        stream: a terminal.
        label: what is in progress.
        transient: erase the bar when done (for steps followed by a summary line).
        clock: monotonic seconds (for the elapsed time shown).
    """

    def __init__(
        self,
        stream: IO[str],
        label: str = "",
        *,
        transient: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._label = label
        self._transient = transient
        self._clock = clock
        self._started = clock()
        self._fraction = -1.0
        self._ended = False

    def render(self, fraction: float) -> str:
        """The bar's text at ``fraction`` done (no carriage return)."""
        filled = round(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        elapsed = self._clock() - self._started
        prefix = f"{self._label} " if self._label else ""
        return f"{prefix}[{bar}] {int(fraction * 100):3d}% {elapsed:5.1f}s"

    def update(self, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if self._ended or fraction < self._fraction:
            return
        self._fraction = fraction
        self._stream.write("\r" + self.render(fraction))
        self._stream.flush()

    def finish(self) -> None:
        if self._ended:
            return
        self.update(1.0)
        self._end()

    def abort(self) -> None:
        if not self._ended:
            self._end()

    def _end(self) -> None:
        self._ended = True
        self._stream.write("\r\x1b[K" if self._transient else "\n")
        self._stream.flush()


def progress_for(stream: IO[str], label: str = "") -> Progress:
    """A bar on a terminal, VBoxManage's percent steps otherwise."""
    if _is_terminal(stream):
        return ProgressBar(stream, label)
    return PercentProgress(stream)


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class Spinner:
    """``label | 2.3s`` on a terminal while an operation without progress runs.

    A context manager: the line is drawn from a thread every 0.1 s and erased
    on exit, so the result printed next starts a clean line.
    """

    def __init__(self, stream: IO[str], label: str) -> None:
        self._stream = stream
        self._label = label
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def __enter__(self) -> Spinner:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()
        self._stream.write("\r\x1b[K")
        self._stream.flush()

    def _spin(self) -> None:
        started = time.monotonic()
        for frame in itertools.cycle("|/-\\"):
            self._stream.write(f"\r{self._label} {frame} {time.monotonic() - started:5.1f}s")
            self._stream.flush()
            if self._done.wait(0.1):
                return


def start_with_progress(
    client: Any, name: str, progress: Progress, *, interval: float = POLL_INTERVAL
) -> Any:
    """``client.start_machine(name)``, showing ``load_progress`` until it returns.

    The start runs in a worker thread; this thread polls ``GetMachine`` every
    ``interval`` seconds over the same (thread-safe) channel. A poll that
    fails is skipped: the start's own outcome is what counts.

    Returns:
        The running machine.

    Raises:
        PageFusionError: the start failed (the progress is aborted first).
    """
    from pagefusion.clients.errors import PageFusionError

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["machine"] = client.start_machine(name)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"start {name}", daemon=True)
    progress.update(0.0)
    worker.start()
    try:
        while True:
            worker.join(interval)
            if not worker.is_alive():
                break
            try:
                machine = client.get_machine(name)
            except PageFusionError:
                continue
            if machine.state == _STARTING:
                progress.update(machine.load_progress)
    except BaseException:
        progress.abort()
        raise
    if "error" in outcome:
        progress.abort()
        raise outcome["error"]
    progress.finish()
    return outcome["machine"]
