"""GuestMemoryService: reads, writes and page states of running machines.

The hint-path RPCs are VirtualBox's shared modules, as its guest agent
drives them: the engine's module registry does the work (see
pagefusion.server.engine.modules).
"""

from __future__ import annotations

import asyncio
from typing import cast

from grpc import aio

from pagefusion.adapters.base import GuestModule, ModuleRegion
from pagefusion.server.engine import FusionEngine
from pagefusion.server.engine_calls import quick
from pagefusion.server.errors import current_resource, invalid_argument
from pagefusion.server.inventory import Inventory
from pagefusion.server.resources import parse_machine_name
from pagefusion.v1 import guest_memory_pb2 as pb
from pagefusion.v1 import guest_memory_pb2_grpc

#: Largest ReadGuestMemory / WriteGuestMemory transfer.
MAX_TRANSFER_BYTES = 4 << 20

#: Parsed machine names kept (a bound: names are client input).
MAX_NAMES_KEPT = 4096


class GuestMemoryServicer(guest_memory_pb2_grpc.GuestMemoryServiceServicer):
    """GuestMemoryService over the engine."""

    def __init__(self, inventory: Inventory, engine: FusionEngine) -> None:
        self._inventory = inventory
        self._engine = engine
        #: Well-formed names seen, and their ids: every call names a machine,
        #: and checking the name's syntax again costs more than the lookup.
        self._ids: dict[str, str] = {}

    def _running(self, name: str) -> str:
        """The id of the running machine ``name``; NOT_FOUND or FAILED_PRECONDITION otherwise."""
        machine_id = self._ids.get(name)
        if machine_id is None:
            machine_id = parse_machine_name(name)
            if len(self._ids) >= MAX_NAMES_KEPT:
                self._ids.clear()
            self._ids[name] = machine_id
        else:
            current_resource.set(name)  # as parse_machine_name does
        self._inventory.require_running(machine_id, name)
        return machine_id

    async def ReadGuestMemory(
        self, request: pb.ReadGuestMemoryRequest, context: aio.ServicerContext
    ) -> pb.ReadGuestMemoryResponse:
        machine_id = self._running(request.name)
        if not 0 < request.length <= MAX_TRANSFER_BYTES:
            raise invalid_argument(
                "length", f"must be 1 to {MAX_TRANSFER_BYTES} bytes, got {request.length}"
            )
        data = await quick(
            self._engine, self._engine.read, machine_id, request.address, request.length
        )
        return pb.ReadGuestMemoryResponse(data=bytes(data))

    async def WriteGuestMemory(
        self, request: pb.WriteGuestMemoryRequest, context: aio.ServicerContext
    ) -> pb.WriteGuestMemoryResponse:
        machine_id = self._running(request.name)
        if len(request.data) > MAX_TRANSFER_BYTES:
            raise invalid_argument(
                "data", f"at most {MAX_TRANSFER_BYTES} bytes, got {len(request.data)}"
            )
        copied = await quick(
            self._engine, self._engine.write, machine_id, request.address, request.data
        )
        return pb.WriteGuestMemoryResponse(pages_copied_on_write=copied)

    async def GetPageInfo(
        self, request: pb.GetPageInfoRequest, context: aio.ServicerContext
    ) -> pb.GetPageInfoResponse:
        machine_id = self._running(request.name)
        info = await quick(self._engine, self._engine.page_info, machine_id, request.address)
        return pb.GetPageInfoResponse(
            state=cast(pb.PageState, int(info.state)), share_count=info.share_count
        )

    # The hint path: VirtualBox's shared modules, driven by a guest agent.

    async def ListGuestModules(
        self, request: pb.ListGuestModulesRequest, context: aio.ServicerContext
    ) -> pb.ListGuestModulesResponse:
        machine_id = self._running(request.name)
        modules = await quick(self._engine, self._engine.modules, machine_id)
        return pb.ListGuestModulesResponse(modules=[module_to_proto(m) for m in modules])

    async def RegisterSharedModule(
        self, request: pb.RegisterSharedModuleRequest, context: aio.ServicerContext
    ) -> pb.RegisterSharedModuleResponse:
        machine_id = self._running(request.name)
        module = module_from_proto(request.module)
        await quick(self._engine, self._engine.register_module, machine_id, module)
        return pb.RegisterSharedModuleResponse()

    async def UnregisterSharedModule(
        self, request: pb.UnregisterSharedModuleRequest, context: aio.ServicerContext
    ) -> pb.UnregisterSharedModuleResponse:
        machine_id = self._running(request.name)
        module = module_from_proto(request.module)
        await quick(self._engine, self._engine.unregister_module, machine_id, module)
        return pb.UnregisterSharedModuleResponse()

    async def CheckSharedModules(
        self, request: pb.CheckSharedModulesRequest, context: aio.ServicerContext
    ) -> pb.CheckSharedModulesResponse:
        machine_id = self._running(request.name)
        checked, fused = await asyncio.to_thread(self._engine.check_shared_modules, machine_id)
        return pb.CheckSharedModulesResponse(pages_checked=checked, pages_fused=fused)

    async def GetPageSharingStatus(
        self, request: pb.GetPageSharingStatusRequest, context: aio.ServicerContext
    ) -> pb.GetPageSharingStatusResponse:
        machine_id = self._running(request.name)
        enabled = await quick(self._engine, self._engine.page_sharing_enabled, machine_id)
        return pb.GetPageSharingStatusResponse(enabled=enabled)


def module_to_proto(module: GuestModule) -> pb.SharedModule:
    return pb.SharedModule(
        module_name=module.module_name,
        version=module.version,
        base_address=module.base_address,
        module_size=module.module_size,
        guest_os=module.guest_os,
        regions=[pb.SharedModuleRegion(address=r.address, size=r.size) for r in module.regions],
    )


def module_from_proto(module: pb.SharedModule) -> GuestModule:
    return GuestModule(
        module_name=module.module_name,
        version=module.version,
        base_address=module.base_address,
        module_size=module.module_size,
        guest_os=module.guest_os,
        regions=tuple(ModuleRegion(r.address, r.size) for r in module.regions),
    )
