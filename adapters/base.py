"""The adapter interface: where guest memory comes from.

An adapter turns a machine's ``memory_source`` (an adapter name plus a
``map<string,string>`` of options) into a :class:`GuestMemory`: the
guest-physical ranges of one machine and a way to read them in large
batches. Adapters know nothing of gRPC or of the engine's internals; the
engine only calls the methods below.

This file is the whole contract, in the spirit of pluggy's hookspecs: empty
methods with docstrings. Third-party adapters subclass :class:`Adapter` and
:class:`GuestMemory` and register the adapter class under the entry-point
group ``pagefusion.adapters``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class MemoryRange:
    """One run of guest-physical memory.

    Attributes:
        address: first guest-physical byte; a multiple of PAGE_SIZE.
        size: bytes in the range; a multiple of PAGE_SIZE (adapters round a
            ragged tail up and read it back zero-padded).
    """

    address: int
    size: int

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE


@dataclass(frozen=True, slots=True)
class ModuleRegion:
    """A region of a module image in guest-physical memory."""

    address: int
    size: int


@dataclass(frozen=True, slots=True)
class GuestModule:
    """A loaded module as a guest agent reports it (VirtualBox's shared module)."""

    module_name: str
    version: str
    base_address: int
    module_size: int
    guest_os: str
    regions: tuple[ModuleRegion, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What the server tells an adapter when it opens a source.

    Attributes:
        machine_id: the machine's id (``machines/{machine_id}``).
        os_type: the machine's ``os_type`` (e.g. ``Windows10_64``).
        memory_size_bytes: the machine's configured size; 0 = from the source.
        allowed_paths: resolved directories the server may open files under;
            adapters must refuse anything outside them (SourcePermissionError).
    """

    machine_id: str
    os_type: str = ""
    memory_size_bytes: int = 0
    allowed_paths: tuple[Path, ...] = ()


class GuestMemory:
    """The memory of one machine, as read from one source. Not thread-safe:
    the engine serialises calls per machine."""

    #: True for sources that change underneath us (shared-memory segments):
    #: the engine re-reads them on scans.
    live: bool = False

    def ranges(self) -> Sequence[MemoryRange]:
        """The guest-physical ranges, sorted by address, not overlapping."""
        raise NotImplementedError

    def read(self, address: int, length: int) -> memoryview | bytes:
        """Return ``length`` bytes of guest-physical memory starting at ``address``.

        The span lies inside one range and is page aligned. The result is a
        bytes-like object of exactly ``length`` bytes (a memoryview over a
        mapping is best: no copy). It must stay valid until the next call.
        Raises SourceError if the source can no longer supply it (a segment
        that shrank or vanished).
        """
        raise NotImplementedError

    def write(self, address: int, data: bytes) -> None:  # pragma: no cover - optional
        """Optional: write guest memory through to a live source."""
        raise NotImplementedError

    def modules(self) -> Sequence[GuestModule]:
        """Modules a guest agent would report; empty when the source cannot tell."""
        return ()

    def idle(self) -> None:
        """Optional: the engine finished a pass over this memory (ingest or a
        scan) and no read of it is under way; drop scratch buffers kept for
        reads. Reads may follow later."""

    def close(self) -> None:
        """Release files, mappings and segments. Called exactly once."""


class Adapter:
    """Opens guest memory for one kind of source. One instance per server."""

    #: The name used in ``memory_source.adapter``.
    name: str = ""
    #: Option names this adapter accepts, with a one-line description each.
    options: Mapping[str, str] = {}

    def check_options(self, options: Mapping[str, str]) -> None:
        """Optional: check option values without opening anything.

        Called when a machine is defined or changed, after the option names
        were checked against :attr:`options`; the source itself may not
        exist yet. The default accepts any values.

        Raises:
            InvalidOptionError: a missing or malformed option (names it).
        """

    def open(self, options: Mapping[str, str], context: AdapterContext) -> GuestMemory:
        """Validate ``options`` and open the source.

        Raises:
            InvalidOptionError: an unknown, missing or malformed option
                (names the option).
            SourceNotFoundError: the file or segment does not exist.
            SourcePermissionError: the path is outside ``allowed_paths``.
            InvalidSourceError: the content is not a usable memory image
                (truncated, overlapping segments, ...).
        """
        raise NotImplementedError


class AdapterError(Exception):
    """Base of the errors adapters raise; the server maps each to a gRPC code.

    Attributes:
        option: the offending option name, when there is one.
    """

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class InvalidOptionError(AdapterError):
    """An option is unknown, missing or malformed (INVALID_ARGUMENT)."""


class InvalidSourceError(AdapterError):
    """The source exists but is not a usable memory image (INVALID_ARGUMENT)."""


class SourceNotFoundError(AdapterError):
    """The file or segment does not exist (NOT_FOUND)."""


class SourcePermissionError(AdapterError):
    """The path lies outside the server's --allow-path roots (PERMISSION_DENIED)."""


class SourceError(AdapterError):
    """A running source failed: shrank, vanished or could not be read (FAILED_PRECONDITION)."""
