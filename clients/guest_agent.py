"""A guest agent for the hint path, after VirtualBox's page-sharing service.

VirtualBox's guest service (VBoxServicePageSharing) wakes every 60 seconds
and: asks the host whether page sharing is enabled; registers the modules
(DLLs, drivers) newly loaded in the guest and unregisters those gone; then
asks the host to check the registered modules, which fuses their pages by
position. :class:`GuestAgent` does the same against a pagefusion server,
with ``ListGuestModules`` standing in for walking the guest's module list.

The agent keeps going through errors (a machine stopped and started again,
a module the server refuses): each cycle logs what it did and what failed.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import grpc

from pagefusion.clients.errors import PageFusionError
from pagefusion.clients.progress import ProgressBar, Spinner
from pagefusion.clients.resources import machine_id_of

ModuleKey = tuple[str, str, int, int]


class _Log(Protocol):
    as_json: bool

    def text(self, text: str) -> None: ...

    def json_line(self, value: Any) -> None: ...


def module_key(module: Any) -> ModuleKey:
    """What UnregisterSharedModule matches on: name, version, base and size."""
    return (module.module_name, module.version, module.base_address, module.module_size)


@dataclass
class CycleReport:
    """What one agent cycle did."""

    machine: str
    enabled: bool = False
    modules: int = 0
    registered: list[str] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)
    pages_checked: int = 0
    pages_fused: int = 0
    errors: list[str] = field(default_factory=list)
    #: False when the cycle stopped at an error (status, listing or check).
    completed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "enabled": self.enabled,
            "modules": self.modules,
            "registered": self.registered,
            "unregistered": self.unregistered,
            "pages_checked": self.pages_checked,
            "pages_fused": self.pages_fused,
            "errors": self.errors,
            "completed": self.completed,
        }

    def summary(self) -> str:
        who = machine_id_of(self.machine)
        if not self.completed:
            return f"{who}: cycle failed: {self.errors[-1] if self.errors else 'unknown error'}"
        if not self.enabled:
            unregistered = f", unregistered {len(self.unregistered)}" if self.unregistered else ""
            return f"{who}: page sharing disabled; nothing to register{unregistered}"
        parts = [
            f"{who}: {self.modules} modules",
            f"registered {len(self.registered)}",
            f"unregistered {len(self.unregistered)}",
            f"checked {self.pages_checked} pages, fused {self.pages_fused}",
        ]
        text = ", ".join(parts)
        if self.errors:
            text += f"; {len(self.errors)} error(s)"
        return text


def _label(module: Any) -> str:
    return f"{module.module_name} {module.version}@{module.base_address:#x}"


class GuestAgent:
    """Registers one machine's modules and asks the server to check them.

    Args:
        client: a connected PageFusionClient.
        name: the machine's resource name.
        log: where each cycle is reported (the CLI's Output).
        warn: called with each error of a cycle (the CLI prints them to stderr).
        terminal: a terminal to show each cycle's progress on (registering
            modules, then the check), erased before the cycle's log line;
            None shows none.
    """

    def __init__(
        self,
        client: Any,
        name: str,
        *,
        log: _Log,
        warn: Callable[[str], None] | None = None,
        terminal: IO[str] | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.log = log
        self.warn = warn
        self.terminal = terminal
        self.registered: dict[ModuleKey, Any] = {}

    def run_forever(self, interval: float, stop: threading.Event) -> None:
        """Run a cycle every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            self.run_cycle()
            # Sleep in short steps so SIGTERM (which sets `stop`) ends us promptly.
            deadline = interval
            while deadline > 0 and not stop.is_set():
                stop.wait(min(deadline, 0.2))
                deadline -= 0.2

    def run_cycle(self) -> CycleReport:
        """Status, register new, unregister gone, check; logs and returns a report."""
        report = CycleReport(self.name)
        try:
            self._cycle(report)
            report.completed = True
        except PageFusionError as error:
            # The machine's module records are gone if it stopped; start over.
            self.registered.clear()
            report.errors.append(f"{error.code.name}: {error.message}")
        self._log(report)
        return report

    def _cycle(self, report: CycleReport) -> None:
        report.enabled = self.client.get_page_sharing_status(self.name)
        if not report.enabled:
            self._unregister(report, list(self.registered))
            return
        modules = self.client.list_guest_modules(self.name)
        report.modules = len(modules)
        current = {module_key(m): m for m in modules}
        self._unregister(report, [k for k in self.registered if k not in current])
        who = machine_id_of(self.name)
        bar = (
            ProgressBar(self.terminal, f"{who}: registering {len(current)} modules",
                        transient=True)
            if self.terminal is not None else None
        )
        try:
            self._register(report, current, bar)
        finally:
            if bar is not None:
                bar.abort()  # transient: erased either way, before the check's spinner
        if self.terminal is None:
            result = self.client.check_shared_modules(self.name)
        else:
            with Spinner(self.terminal, f"{who}: checking the pages of {len(current)} modules"):
                result = self.client.check_shared_modules(self.name)
        report.pages_checked = int(result.pages_checked)
        report.pages_fused = int(result.pages_fused)

    def _register(
        self, report: CycleReport, current: dict[ModuleKey, Any], bar: ProgressBar | None
    ) -> None:
        for done, (key, module) in enumerate(current.items()):
            if bar is not None:
                bar.update(done / len(current))
            # Modules this agent registered before are registered again: if the
            # machine was stopped and started meanwhile, the server forgot them
            # (its answer for a known module is "already registered").
            try:
                self.client.register_shared_module(self.name, module)
            except PageFusionError as error:
                if error.code != grpc.StatusCode.ALREADY_EXISTS:
                    self.registered.pop(key, None)
                    report.errors.append(
                        f"register {_label(module)}: {error.code.name}: {error.message}"
                    )
                    continue
            if key not in self.registered:
                self.registered[key] = module
                report.registered.append(_label(module))

    def _unregister(self, report: CycleReport, keys: Iterable[ModuleKey]) -> None:
        for key in keys:
            module = self.registered.pop(key)
            try:
                self.client.unregister_shared_module(self.name, module)
            except PageFusionError as error:
                if error.code != grpc.StatusCode.NOT_FOUND:
                    report.errors.append(
                        f"unregister {_label(module)}: {error.code.name}: {error.message}"
                    )
                    continue
            report.unregistered.append(_label(module))

    def _log(self, report: CycleReport) -> None:
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        self.log.json_line({"time": stamp, **report.as_dict()})
        self.log.text(f"{stamp} guest-agent {report.summary()}\n")
        if self.warn is not None:
            for error in report.errors:
                self.warn(f"guest-agent {machine_id_of(self.name)}: {error}")
