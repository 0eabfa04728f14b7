"""The in-memory adapter: guest memory held in numpy arrays.

For tests and for users who build guest memory in Python, the way httpx
ships ``MockTransport``. Two ways in:

* Python: ``InMemoryGuestMemory([(0, data), (0x100000, more)])`` from bytes,
  bytearrays or numpy arrays; mutate it with :meth:`InMemoryGuestMemory.write`
  and set ``live = True`` to make it behave like a live source for scans.
  ``register_image("name", memory)`` lets a server in the same process open
  it with ``adapter=memory, options={image: name}``.
* Options (over gRPC): ``size`` plus ``pattern`` and ``seed`` generate
  deterministic content.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from pagefusion.adapters.base import (
    PAGE_SIZE,
    Adapter,
    AdapterContext,
    GuestMemory,
    GuestModule,
    InvalidOptionError,
    MemoryRange,
    SourceError,
    SourceNotFoundError,
)
from pagefusion.adapters.helpers import (
    RangeLookup,
    page_aligned,
    page_round_up,
    parse_bool,
    parse_int,
    parse_size,
    validate_ranges,
)

__all__ = [
    "PATTERNS",
    "InMemoryGuestMemory",
    "MemoryAdapter",
    "generate_pattern",
    "register_image",
    "unregister_image",
]

Buffer = bytes | bytearray | memoryview | np.ndarray

#: Largest memory the option path generates (the Python API has no limit).
MAX_GENERATED_BYTES = 16 << 30

PATTERNS = {
    "zero": "every page zero",
    "random": "every page random bytes (unique)",
    "same": "every page the same non-zero content",
    "pages": "page n holds n in its first 8 bytes, zeros elsewhere (unique, compressible)",
    "mixed": "1/4 zero, 1/2 copies of 16 shared pages, 1/4 unique (the default)",
}


def _as_array(data: Buffer, copy: bool = True) -> np.ndarray:
    if isinstance(data, np.ndarray):
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        flat = np.frombuffer(data, dtype=np.uint8)
    if not copy and flat.size and flat.size % PAGE_SIZE == 0 and flat.flags.writeable:
        return flat
    padded = page_aligned(page_round_up(max(flat.size, 1)))  # as guest RAM is
    padded[: flat.size] = flat
    return padded


class InMemoryGuestMemory(GuestMemory):
    """Guest memory built from Python buffers (copied into numpy arrays).

    Args:
        ranges: ``(address, data)`` pairs; each address page aligned, data of
            any length (a ragged tail is zero padded to a page).
        modules: the modules :meth:`modules` reports.
        live: whether the engine should treat this as a live source.
        copy: False to adopt writable page-multiple numpy arrays without copying.
    """

    def __init__(
        self,
        ranges: Iterable[tuple[int, Buffer]],
        modules: Sequence[GuestModule] = (),
        *,
        live: bool = False,
        copy: bool = True,
    ) -> None:
        pairs = sorted(((int(a), _as_array(d, copy)) for a, d in ranges), key=lambda p: p[0])
        for address, _ in pairs:
            if address % PAGE_SIZE or address < 0:
                raise ValueError(f"range address {address:#x} is not page aligned")
        self._arrays = [array for _, array in pairs]
        self._ranges = tuple(MemoryRange(a, arr.size) for a, arr in pairs)
        validate_ranges(self._ranges, "in-memory guest memory")
        self._lookup = RangeLookup(self._ranges)
        self._modules = tuple(modules)
        self.live = live
        self.closed = False
        self._lock = threading.Lock()

    @classmethod
    def from_bytes(cls, data: Buffer, address: int = 0, **kwargs: object) -> InMemoryGuestMemory:
        """One range starting at ``address`` (a raw image)."""
        return cls([(address, data)], **kwargs)  # type: ignore[arg-type]

    @classmethod
    def zeros(cls, size: int, address: int = 0) -> InMemoryGuestMemory:
        """One all-zero range of ``size`` bytes."""
        return cls([(address, np.zeros(size, dtype=np.uint8))])

    def ranges(self) -> Sequence[MemoryRange]:
        return self._ranges

    def read(self, address: int, length: int) -> memoryview:
        if self.closed:
            raise SourceError("in-memory guest memory is closed")
        i = self._lookup.find(address, length)
        offset = address - self._ranges[i].address
        return memoryview(self._arrays[i][offset : offset + length].data)

    def array(self, address: int, length: int) -> np.ndarray:
        """A writable numpy view of guest memory, for tests that mutate pages in place."""
        i, offset = self._locate(address, length)
        return self._arrays[i][offset : offset + length]

    def write(self, address: int, data: Buffer) -> None:
        """Write ``data`` at ``address`` (any alignment, inside one range)."""
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else (
            np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        )
        with self._lock:
            i, offset = self._locate(address, src.size)
            self._arrays[i][offset : offset + src.size] = src

    def _locate(self, address: int, length: int) -> tuple[int, int]:
        for i, r in enumerate(self._ranges):
            if r.address <= address and address + length <= r.end:
                return i, address - r.address
        raise ValueError(f"span {address:#x}+{length:#x} is not inside one guest memory range")

    def modules(self) -> Sequence[GuestModule]:
        return self._modules

    def close(self) -> None:
        self.closed = True


class _RegisteredView(GuestMemory):
    """What the adapter hands the engine for a registered image: closing it
    leaves the image (owned by whoever registered it) intact."""

    def __init__(self, name: str, image: InMemoryGuestMemory) -> None:
        self._name = name
        self._image = image
        self._closed = False
        self.live = image.live

    def ranges(self) -> Sequence[MemoryRange]:
        return self._image.ranges()

    def read(self, address: int, length: int) -> memoryview:
        if self._closed or _IMAGES.get(self._name) is not self._image:
            raise SourceError(f"in-memory image {self._name!r} was closed or unregistered")
        return self._image.read(address, length)

    def write(self, address: int, data: bytes) -> None:
        self._image.write(address, data)

    def modules(self) -> Sequence[GuestModule]:
        return self._image.modules()

    def close(self) -> None:
        self._closed = True


_IMAGES: dict[str, InMemoryGuestMemory] = {}


def register_image(name: str, memory: InMemoryGuestMemory) -> None:
    """Make ``memory`` openable in this process as ``adapter=memory, image=name``."""
    _IMAGES[name] = memory


def unregister_image(name: str) -> None:
    """Forget a registered image; open views of it fail their next read with SourceError."""
    _IMAGES.pop(name, None)


def generate_pattern(pattern: str, size: int, seed: int = 0) -> np.ndarray:
    """Deterministic guest memory of ``size`` bytes (a page multiple) in a named pattern."""
    pages = size // PAGE_SIZE
    rng = np.random.default_rng(seed)
    if pattern == "zero":
        return np.zeros(size, dtype=np.uint8)
    if pattern == "random":
        return rng.integers(0, 256, size, dtype=np.uint8)
    if pattern == "same":
        page = rng.integers(1, 256, PAGE_SIZE, dtype=np.uint8)
        return np.tile(page, pages)
    if pattern == "pages":
        words = np.zeros((pages, PAGE_SIZE // 8), dtype=np.uint64)
        words[:, 0] = np.arange(1, pages + 1, dtype=np.uint64) + (np.uint64(seed) << np.uint64(32))
        return words.reshape(-1).view(np.uint8)
    if pattern == "mixed":
        out = rng.integers(0, 256, size, dtype=np.uint8).reshape(pages, PAGE_SIZE)
        shared = rng.integers(1, 256, (16, PAGE_SIZE), dtype=np.uint8)
        kind = np.arange(pages) % 4  # 0: zero, 1-2: shared copy, 3: unique
        out[kind == 0] = 0
        copies = np.flatnonzero((kind == 1) | (kind == 2))
        out[copies] = shared[np.arange(copies.size) % 16]
        return out.reshape(-1)
    raise InvalidOptionError(
        f"unknown pattern {pattern!r} (known: {', '.join(PATTERNS)})", option="pattern"
    )


class MemoryAdapter(Adapter):
    """Guest memory held in this process: generated from options or registered from Python."""

    name = "memory"
    options = {
        "size": "bytes of guest memory (e.g. 67108864 or 64MiB); default the machine's size",
        "pattern": "content: " + "; ".join(f"{k} = {v}" for k, v in PATTERNS.items()),
        "seed": "integer seed of the generated content (default 0)",
        "live": "true to let scans re-read the source (default false)",
        "image": "name of an image registered in this process with register_image()",
    }

    def open(self, options: Mapping[str, str], context: AdapterContext) -> GuestMemory:
        live = parse_bool(options, "live", False)
        if "image" in options:
            extra = sorted(set(options) - {"image", "live"})
            if extra:
                raise InvalidOptionError(
                    f"option {extra[0]!r} cannot be combined with 'image'", option=extra[0]
                )
            image = _IMAGES.get(options["image"])
            if image is None:
                raise SourceNotFoundError(
                    f"no in-memory image registered as {options['image']!r}", option="image"
                )
            if "live" in options:
                image.live = live
            return _RegisteredView(options["image"], image)
        size = parse_size(options, "size", context.memory_size_bytes or 0)
        if size <= 0:
            raise InvalidOptionError(
                "option 'size' is required when the machine's memory_size_bytes is 0",
                option="size",
            )
        if size % PAGE_SIZE:
            raise InvalidOptionError(
                f"option 'size' must be a multiple of {PAGE_SIZE}, got {size}", option="size"
            )
        if size > MAX_GENERATED_BYTES:
            raise InvalidOptionError(
                f"option 'size' {size} exceeds the in-memory limit of {MAX_GENERATED_BYTES}",
                option="size",
            )
        pattern = options.get("pattern", "mixed")
        seed = parse_int(options, "seed", 0)
        if seed < 0:
            raise InvalidOptionError("option 'seed' must not be negative", option="seed")
        return InMemoryGuestMemory(
            [(0, generate_pattern(pattern, size, seed))], live=live, copy=False
        )
