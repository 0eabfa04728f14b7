"""The machines the server knows: the registry's definitions plus live states.

Servicers share one :class:`Inventory`. It keeps every machine in memory
(the registry is read once at start) and writes changes through to the
registry before they become visible. Machine states are never stored: memory
is RAM, so a restarted server has every machine powered off.

All methods run on the event loop (but :meth:`set_progress`, which a
start's worker thread calls); registry I/O goes to a thread. A per-machine
asyncio lock serialises changes to one machine (update, delete and the state
transitions of start and stop) so that a check and the change it guards
cannot interleave with another call.

``load_progress`` is derived, never stored: the share of the source read so
far while a machine starts, 1 while it runs (or stops), 0 powered off.
"""

from __future__ import annotations

import asyncio
import collections

from pagefusion.server.errors import already_exists, failed_precondition, not_found
from pagefusion.server.registry import Registry
from pagefusion.server.resources import MACHINE_TYPE, machine_name
from pagefusion.v1 import machine_pb2


class Inventory:
    """Machines by id, with their current state."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._machines: dict[str, machine_pb2.Machine] = registry.load_machines()
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        # Written by start threads, read on the loop: one float per key, so a
        # reader sees an old or a new value, never a torn one.
        self._progress: dict[str, float] = {}

    def lock(self, machine_id: str) -> asyncio.Lock:
        """The lock serialising changes to one machine."""
        return self._locks[machine_id]

    def get(self, machine_id: str) -> machine_pb2.Machine:
        """A copy of the machine; NOT_FOUND if there is none."""
        machine = self._machines.get(machine_id)
        if machine is None:
            raise not_found(MACHINE_TYPE, machine_name(machine_id))
        copy = machine_pb2.Machine()
        copy.CopyFrom(machine)
        copy.load_progress = self._load_progress(machine_id, machine.state)
        return copy

    def _load_progress(self, machine_id: str, state: machine_pb2.Machine.State) -> float:
        if state == machine_pb2.Machine.STATE_STARTING:
            return self._progress.get(machine_id, 0.0)
        if state in (machine_pb2.Machine.STATE_RUNNING, machine_pb2.Machine.STATE_STOPPING):
            return 1.0
        return 0.0

    def set_progress(self, machine_id: str, done: int, total: int) -> None:
        """Record a start's progress (pages read of ``total``); callable from any thread."""
        if total > 0:
            self._progress[machine_id] = min(max(done / total, 0.0), 1.0)

    def ids(self) -> list[str]:
        return sorted(self._machines)

    def state(self, machine_id: str) -> machine_pb2.Machine.State:
        return self.get(machine_id).state

    def require_running(self, machine_id: str, name: str) -> None:
        """NOT_FOUND if there is no such machine, FAILED_PRECONDITION unless it runs."""
        state = self.state(machine_id)
        if state != machine_pb2.Machine.STATE_RUNNING:
            raise failed_precondition(
                name,
                f"the machine is not running (it is {machine_pb2.Machine.State.Name(state)})",
                reason="MACHINE_NOT_RUNNING",
            )

    def set_state(self, machine_id: str, state: machine_pb2.Machine.State) -> None:
        machine = self._machines.get(machine_id)
        if machine is not None:
            machine.state = state
        # A start begins at 0; once it is over, the state alone says 1 or 0.
        self._progress.pop(machine_id, None)

    async def create(self, machine_id: str, machine: machine_pb2.Machine) -> machine_pb2.Machine:
        """Store a new machine; ALREADY_EXISTS if the id is taken."""
        machine.ClearField("load_progress")  # derived from the state, never stored
        async with self.lock(machine_id):
            if machine_id in self._machines:
                raise already_exists(MACHINE_TYPE, machine_name(machine_id))
            if not await asyncio.to_thread(self._registry.insert_machine, machine_id, machine):
                raise already_exists(MACHINE_TYPE, machine_name(machine_id))
            self._machines[machine_id] = machine
            return self.get(machine_id)

    async def replace(self, machine_id: str, machine: machine_pb2.Machine) -> machine_pb2.Machine:
        """Store new values of an existing machine. Hold :meth:`lock` around check and call."""
        machine.ClearField("load_progress")  # derived from the state, never stored
        await asyncio.to_thread(self._registry.update_machine, machine_id, machine)
        machine.state = self._machines[machine_id].state
        self._machines[machine_id] = machine
        return self.get(machine_id)

    async def delete(self, machine_id: str) -> None:
        """Forget a machine. Hold :meth:`lock` around check and call."""
        await asyncio.to_thread(self._registry.delete_machine, machine_id)
        self._machines.pop(machine_id, None)
