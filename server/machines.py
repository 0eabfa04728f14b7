"""MachineService: machine definitions and their lifecycle.

Starting a machine opens its memory source through its adapter and hands it
to the engine, which reads and fuses every page; both run in a worker thread
while the machine shows STATE_STARTING. The state transition runs as its own
task, so a client that gives up waiting does not leave the state behind
what the engine did.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import structlog
from google.protobuf import empty_pb2, field_mask_pb2
from grpc import aio

from pagefusion.adapters.base import Adapter, AdapterContext
from pagefusion.adapters.registry import AdapterGateway
from pagefusion.server.engine import FusionEngine
from pagefusion.server.errors import failed_precondition, invalid_argument, quote
from pagefusion.server.inventory import Inventory
from pagefusion.server.resources import (
    MACHINE_ID_RE,
    RESERVED_IDS,
    check_machine_id,
    machine_name,
    parse_machine_name,
)
from pagefusion.v1 import machine_pb2, machine_pb2_grpc

Machine = machine_pb2.Machine
log = structlog.get_logger(__name__)
_LOG_PROGRESS_PAGES = (1 << 30) // 4096
State = Machine.State

DEFAULT_FUSION_DOMAIN = "default"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_DISPLAY_NAME = 256
MAX_OS_TYPE = 64
PAGE_SIZE_BYTES = 4096

#: Fields UpdateMachine may change; an empty mask (or `*`) means all of them.
MUTABLE_FIELDS = (
    "display_name",
    "memory_size_bytes",
    "os_type",
    "page_fusion_enabled",
    "fusion_domain",
    "memory_source",
)
#: Fields the engine is started with: changeable only while powered off.
FUSION_FIELDS = ("page_fusion_enabled", "fusion_domain")
#: Output-only fields: ignored in update masks (AIP-161).
OUTPUT_ONLY_FIELDS = ("name", "state", "create_time", "load_progress")
_SUBFIELDS = {"memory_source.adapter", "memory_source.options"}


def state_name(state: machine_pb2.Machine.State) -> str:
    return State.Name(state)


class MachineServicer(machine_pb2_grpc.MachineServiceServicer):
    """MachineService over the inventory (definitions) and the engine (memory)."""

    def __init__(
        self,
        inventory: Inventory,
        engine: FusionEngine,
        adapters: Mapping[str, Adapter] | AdapterGateway,
        allowed_paths: tuple[Path, ...] = (),
    ) -> None:
        self._inventory = inventory
        self._engine = engine
        # Every adapter lookup, option check and open goes through the gateway.
        self._gateway = (
            adapters if isinstance(adapters, AdapterGateway) else AdapterGateway(adapters)
        )
        self._allowed_paths = allowed_paths
        self._transitions: set[asyncio.Task[None]] = set()

    # standard methods

    async def CreateMachine(
        self, request: machine_pb2.CreateMachineRequest, context: aio.ServicerContext
    ) -> Machine:
        machine_id = check_machine_id(request.machine_id)
        if machine_id in RESERVED_IDS:
            # `host` names the host object of the performance metrics.
            raise invalid_argument(
                "machine_id",
                f"machine id {quote(machine_id)} is reserved (it names the host in metrics)",
            )
        machine = Machine()
        machine.CopyFrom(request.machine)
        machine.name = machine_name(machine_id)
        machine.state = State.STATE_POWERED_OFF
        machine.create_time.GetCurrentTime()
        if not machine.fusion_domain:
            machine.fusion_domain = DEFAULT_FUSION_DOMAIN
        self._validate(machine)
        return await self._inventory.create(machine_id, machine)

    async def GetMachine(
        self, request: machine_pb2.GetMachineRequest, context: aio.ServicerContext
    ) -> Machine:
        return self._inventory.get(parse_machine_name(request.name))

    async def ListMachines(
        self, request: machine_pb2.ListMachinesRequest, context: aio.ServicerContext
    ) -> machine_pb2.ListMachinesResponse:
        if request.page_size < 0:
            raise invalid_argument("page_size", "must not be negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(request.page_token) if request.page_token else ""
        ids = [i for i in self._inventory.ids() if i > after]
        page = ids[:page_size]
        response = machine_pb2.ListMachinesResponse(machines=[self._inventory.get(i) for i in page])
        if len(ids) > page_size:
            response.next_page_token = _encode_page_token(page[-1])
        return response

    async def UpdateMachine(
        self, request: machine_pb2.UpdateMachineRequest, context: aio.ServicerContext
    ) -> Machine:
        machine_id = parse_machine_name(request.machine.name, "machine.name")
        paths = _mask_paths(request.update_mask)
        async with self._inventory.lock(machine_id):
            current = self._inventory.get(machine_id)
            updated = Machine()
            updated.CopyFrom(current)
            for path in paths:
                _copy_field(request.machine, updated, path)
            if not updated.fusion_domain:
                updated.fusion_domain = DEFAULT_FUSION_DOMAIN
            self._validate(updated)
            if current.state != State.STATE_POWERED_OFF:
                for field in FUSION_FIELDS:
                    if getattr(current, field) != getattr(updated, field):
                        raise failed_precondition(
                            current.name,
                            f"{field} can be changed only while the machine is powered off "
                            f"(it is {state_name(current.state)})",
                            reason="MACHINE_NOT_POWERED_OFF",
                        )
            return await self._inventory.replace(machine_id, updated)

    async def DeleteMachine(
        self, request: machine_pb2.DeleteMachineRequest, context: aio.ServicerContext
    ) -> empty_pb2.Empty:
        machine_id = parse_machine_name(request.name)
        async with self._inventory.lock(machine_id):
            self._require_state(machine_id, State.STATE_POWERED_OFF, "deleted")
            await self._inventory.delete(machine_id)
        return empty_pb2.Empty()

    # lifecycle

    async def StartMachine(
        self, request: machine_pb2.StartMachineRequest, context: aio.ServicerContext
    ) -> Machine:
        machine_id = parse_machine_name(request.name)
        async with self._inventory.lock(machine_id):
            machine = self._require_state(machine_id, State.STATE_POWERED_OFF, "started")
            self._inventory.set_state(machine_id, State.STATE_STARTING)
        await self._transition(self._start(machine))
        return self._inventory.get(machine_id)

    async def _start(self, machine: Machine) -> None:
        machine_id = machine.name.partition("/")[2]
        try:
            await asyncio.to_thread(self._start_blocking, machine_id, machine)
        finally:
            running = self._engine.is_running(machine_id)
            self._inventory.set_state(
                machine_id, State.STATE_RUNNING if running else State.STATE_POWERED_OFF
            )

    def _start_blocking(self, machine_id: str, machine: Machine) -> None:
        source = machine.memory_source
        context = AdapterContext(
            machine_id=machine_id,
            os_type=machine.os_type,
            memory_size_bytes=machine.memory_size_bytes,
            allowed_paths=self._allowed_paths,
        )
        memory = self._gateway.open(source.adapter, dict(source.options), context)
        self._engine.start_machine(
            machine_id,
            memory,
            page_fusion=machine.page_fusion_enabled,
            fusion_domain=machine.fusion_domain or DEFAULT_FUSION_DOMAIN,
            progress=self._progress(machine_id),
        )

    def _progress(self, machine_id: str) -> Callable[[int, int], None]:
        """The engine's progress callback: GetMachine's load_progress, and the log."""
        log_progress = _progress_logger(machine_id)

        def progress(done: int, total: int) -> None:
            self._inventory.set_progress(machine_id, done, total)
            log_progress(done, total)

        return progress

    async def StopMachine(
        self, request: machine_pb2.StopMachineRequest, context: aio.ServicerContext
    ) -> Machine:
        machine_id = parse_machine_name(request.name)
        async with self._inventory.lock(machine_id):
            self._require_state(machine_id, State.STATE_RUNNING, "stopped")
            self._inventory.set_state(machine_id, State.STATE_STOPPING)
        await self._transition(self._stop(machine_id))
        return self._inventory.get(machine_id)

    async def _stop(self, machine_id: str) -> None:
        try:
            await asyncio.to_thread(self._engine.stop_machine, machine_id)
        finally:
            running = self._engine.is_running(machine_id)
            self._inventory.set_state(
                machine_id, State.STATE_RUNNING if running else State.STATE_POWERED_OFF
            )

    async def _transition(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a start or stop as its own task: a caller that gives up (or a
        shutdown that cancels the call) does not cut it short."""
        task = asyncio.ensure_future(work)
        self._transitions.add(task)
        task.add_done_callback(self._transitions.discard)
        await asyncio.shield(task)

    async def drain(self) -> None:
        """Wait for starts and stops in progress (used on shutdown)."""
        if self._transitions:
            await asyncio.gather(*self._transitions, return_exceptions=True)

    # checks

    def _require_state(
        self, machine_id: str, state: machine_pb2.Machine.State, verb: str
    ) -> Machine:
        machine = self._inventory.get(machine_id)
        if machine.state != state:
            raise failed_precondition(
                machine.name,
                f"the machine can be {verb} only when {state_name(state)}; "
                f"it is {state_name(machine.state)}",
                reason="MACHINE_NOT_RUNNING"
                if state == State.STATE_RUNNING
                else "MACHINE_NOT_POWERED_OFF",
            )
        return machine

    def _validate(self, machine: Machine) -> None:
        if len(machine.display_name) > MAX_DISPLAY_NAME:
            raise invalid_argument("machine.display_name", f"at most {MAX_DISPLAY_NAME} characters")
        if len(machine.os_type) > MAX_OS_TYPE:
            raise invalid_argument("machine.os_type", f"at most {MAX_OS_TYPE} characters")
        if machine.memory_size_bytes % PAGE_SIZE_BYTES:
            raise invalid_argument(
                "machine.memory_size_bytes",
                f"must be a multiple of the page size ({PAGE_SIZE_BYTES}), "
                f"got {machine.memory_size_bytes}",
            )
        if not MACHINE_ID_RE.fullmatch(machine.fusion_domain):
            raise invalid_argument(
                "machine.fusion_domain",
                f"invalid fusion domain {quote(machine.fusion_domain)}: lowercase letters, digits "
                "and '-', 1 to 63 characters, starting with a letter",
            )
        self._gateway.check(machine.memory_source.adapter, machine.memory_source.options)


def _mask_paths(mask: field_mask_pb2.FieldMask) -> list[str]:
    """The fields to copy for an update mask; INVALID_ARGUMENT for unknown paths."""
    if not mask.paths or list(mask.paths) == ["*"]:
        return list(MUTABLE_FIELDS)
    paths = []
    for path in mask.paths:
        if path in OUTPUT_ONLY_FIELDS:
            continue
        if path not in MUTABLE_FIELDS and path not in _SUBFIELDS:
            raise invalid_argument(
                "update_mask",
                f"unknown or immutable field {quote(path)} (mutable: {', '.join(MUTABLE_FIELDS)})",
            )
        paths.append(path)
    return paths


def _copy_field(source: Machine, target: Machine, path: str) -> None:
    if path == "memory_source.adapter":
        target.memory_source.adapter = source.memory_source.adapter
    elif path == "memory_source.options":
        target.memory_source.options.clear()
        target.memory_source.options.update(source.memory_source.options)
    elif path == "memory_source":
        target.memory_source.CopyFrom(source.memory_source)
    else:
        setattr(target, path, getattr(source, path))


def _encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()


def _decode_page_token(token: str) -> str:
    try:
        last_id = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        last_id = ""
    if not MACHINE_ID_RE.fullmatch(last_id):
        raise invalid_argument("page_token", "invalid page token; pass next_page_token unchanged")
    return last_id


def _progress_logger(machine_id: str) -> Callable[[int, int], None]:
    """Log a long start's progress at each further quarter (machines of 1 GiB or more)."""
    logged = [0]

    def progress(done: int, total: int) -> None:
        if total < _LOG_PROGRESS_PAGES:
            return
        quarter = done * 4 // total
        if quarter > logged[0] and done < total:
            logged[0] = quarter
            log.info("machine_loading", machine=machine_id, pages_done=done, pages_total=total)

    return progress
