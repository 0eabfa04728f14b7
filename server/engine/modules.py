"""The module registry of the hint path (VirtualBox's shared modules).

A guest agent tells the host which modules (DLLs, drivers) a machine has
loaded: name, version, base address, size, guest OS and up to 32 regions of
guest-physical memory. The host then compares just those pages, by
position, instead of hashing all memory.

Two levels, as in VirtualBox's GMM:

* Global modules, one per (fusion domain, module identity). The identity is
  name, version, size, guest OS and each region's in-page offset and
  page-rounded size; base addresses are left out, so the same DLL loaded at
  different bases in different machines (ASLR) is one global module. A
  global module holds, per region, the canonical frame of each page
  position (0 = none offered yet).
* Per machine, the modules it registered, keyed by base address.

Canonical frames carry the pool's HINTED bit. A canonical frame that is
freed or rewritten in place stops being canonical at once (the engine calls
:meth:`ModuleRegistry.forget_frames`), so a position can never point at a
frame whose content or owner changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pagefusion.adapters.base import GuestModule
from pagefusion.server.engine.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from pagefusion.server.engine.types import PAGE_SIZE

MAX_REGIONS = 32
MAX_NAME_BYTES = 127
MAX_VERSION_BYTES = 15
MAX_MODULE_SIZE = 1 << 30
MAX_MODULES_PER_MACHINE = 2048

#: name, version, size, guest OS, ((in-page offset, page-rounded size), ...)
ModuleKey = tuple[str, str, int, str, tuple[tuple[int, int], ...]]


def region_pages(address: int, size: int) -> int:
    """Pages a region touches."""
    first = address // PAGE_SIZE
    last = (address + size - 1) // PAGE_SIZE
    return last - first + 1


def module_key(module: GuestModule) -> ModuleKey:
    """Validate a module hint against VirtualBox's limits; return its identity.

    Raises:
        InvalidArgumentError: naming the offending field.
    """
    name_bytes = len(module.module_name.encode())
    if not 1 <= name_bytes <= MAX_NAME_BYTES:
        raise InvalidArgumentError(
            f"module_name must be 1 to {MAX_NAME_BYTES} bytes, got {name_bytes}",
            field="module.module_name",
        )
    version_bytes = len(module.version.encode())
    if version_bytes > MAX_VERSION_BYTES:
        raise InvalidArgumentError(
            f"version must be at most {MAX_VERSION_BYTES} bytes, got {version_bytes}",
            field="module.version",
        )
    if not 1 <= module.module_size <= MAX_MODULE_SIZE:
        raise InvalidArgumentError(
            f"module_size must be 1 byte to 1 GiB, got {module.module_size}",
            field="module.module_size",
        )
    if not 1 <= len(module.regions) <= MAX_REGIONS:
        raise InvalidArgumentError(
            f"a module has 1 to {MAX_REGIONS} regions, got {len(module.regions)}",
            field="module.regions",
        )
    shape = []
    for i, region in enumerate(module.regions):
        if region.size <= 0 or region.size > MAX_MODULE_SIZE or region.address < 0:
            raise InvalidArgumentError(
                f"region {i} must have a size of 1 byte to 1 GiB and a non-negative address",
                field=f"module.regions[{i}]",
            )
        offset = region.address % PAGE_SIZE
        shape.append((offset, region_pages(region.address, region.size) * PAGE_SIZE))
    return (module.module_name, module.version, module.module_size, module.guest_os, tuple(shape))


@dataclass(eq=False)
class GlobalModule:
    """One module identity within one fusion domain."""

    key: ModuleKey
    canonical: list[np.ndarray]  # per region: frame per page position (0 = none)
    users: int = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.canonical)


@dataclass(eq=False)
class Registration:
    """A module as one machine registered it."""

    module: GuestModule
    shared: GlobalModule
    pages: list[np.ndarray]  # per region: flat guest page indices


@dataclass
class MachineModules:
    domain: str
    by_base: dict[int, Registration] = field(default_factory=dict)


class ModuleRegistry:
    """Global and per-machine module records. Not thread-safe (engine lock)."""

    def __init__(self) -> None:
        self._global: dict[tuple[str, ModuleKey], GlobalModule] = {}
        self._machines: dict[str, MachineModules] = {}

    @property
    def nbytes(self) -> int:
        total = sum(g.nbytes for g in self._global.values())
        for m in self._machines.values():
            total += sum(sum(p.nbytes for p in r.pages) for r in m.by_base.values())
        return total

    def registrations(self, machine_id: str) -> list[Registration]:
        m = self._machines.get(machine_id)
        return list(m.by_base.values()) if m else []

    def register(
        self, machine_id: str, domain: str, module: GuestModule, pages: list[np.ndarray]
    ) -> None:
        """Record a module for a machine (limits already checked by module_key)."""
        key = module_key(module)
        machine = self._machines.setdefault(machine_id, MachineModules(domain))
        existing = machine.by_base.get(module.base_address)
        if existing is not None:
            if existing.shared.key == key:
                raise AlreadyExistsError(
                    f"module {module.module_name!r} {module.version!r} is already registered "
                    f"at base {module.base_address:#x}",
                    field="module",
                    reason="MODULE_ALREADY_REGISTERED",
                )
            raise FailedPreconditionError(
                f"base address {module.base_address:#x} is already used by module "
                f"{existing.module.module_name!r} {existing.module.version!r} (address clash)",
                field="module.base_address",
                reason="MODULE_ADDRESS_CLASH",
            )
        if len(machine.by_base) >= MAX_MODULES_PER_MACHINE:
            raise InvalidArgumentError(
                f"a machine registers at most {MAX_MODULES_PER_MACHINE} modules",
                field="module",
                reason="TOO_MANY_MODULES",
            )
        shared = self._global.get((domain, key))
        if shared is None:
            shared = GlobalModule(
                key, [np.zeros(size // PAGE_SIZE, dtype=np.uint32) for _, size in key[4]]
            )
            self._global[(domain, key)] = shared
        shared.users += 1
        machine.by_base[module.base_address] = Registration(module, shared, pages)

    def unregister(self, machine_id: str, module: GuestModule) -> None:
        machine = self._machines.get(machine_id)
        reg = machine.by_base.get(module.base_address) if machine else None
        if (
            machine is None
            or reg is None
            or reg.module.module_name != module.module_name
            or reg.module.version != module.version
            or reg.module.module_size != module.module_size
        ):
            raise NotFoundError(
                f"module {module.module_name!r} {module.version!r} at base "
                f"{module.base_address:#x} (size {module.module_size}) is not registered "
                f"for machine {machine_id!r}",
                field="module",
                reason="MODULE_NOT_REGISTERED",
            )
        del machine.by_base[module.base_address]
        self._release(machine.domain, reg.shared)

    def drop_machine(self, machine_id: str) -> None:
        """Forget every record of a machine (it stopped)."""
        machine = self._machines.pop(machine_id, None)
        if machine is None:
            return
        for reg in machine.by_base.values():
            self._release(machine.domain, reg.shared)

    def _release(self, domain: str, shared: GlobalModule) -> None:
        shared.users -= 1
        if shared.users == 0:  # like GMM: the last user gone, the module goes
            del self._global[(domain, shared.key)]

    def canonical_frames(self) -> list[tuple[str, str, np.ndarray]]:
        """Copies of every region's canonical frames: (domain, module name, frames)."""
        return [
            (domain, shared.key[0], canonical.copy())
            for (domain, _), shared in self._global.items()
            for canonical in shared.canonical
        ]

    def forget_frames(self, domain: str, frames: np.ndarray) -> np.ndarray:
        """Frames stop being canonical anywhere in ``domain``; returns them."""
        if not len(frames):
            return frames
        for (d, _), shared in self._global.items():
            if d != domain:
                continue
            for canonical in shared.canonical:
                hit = np.isin(canonical, frames)
                if hit.any():
                    canonical[hit] = 0
        return frames
