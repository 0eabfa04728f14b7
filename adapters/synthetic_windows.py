"""The ``synthetic-windows`` adapter: deterministic synthetic Windows guests.

A machine's memory is described at open as a list of extents (runs of
guest pages of one kind) and synthesised on each ``read`` for the requested
span only, so a 2 GiB guest costs a few hundred kilobytes until it is read.
The kinds, and what makes two machines' pages equal or not:

``zero``
    Free RAM Windows zeroed; the largest single share.
``image``
    Sections of PE-like module images (kernel, HAL, drivers, system DLLs).
    The pristine bytes depend only on (architecture, module name, version);
    each section sits at its own guest-physical extent. Relocation fixups
    write ``base + rva`` pointers, so the pages that carry fixups depend on
    the per-boot (ASLR) base and differ between machines; every other image
    page is identical on every machine of the profile.
``cache``
    Page cache (standby list) of common system files: same bytes on every
    machine of the build.
``private``
    Heap, stack, pool and dirtied ``.data`` pages: unique to the machine.
``compressed``
    Windows 10+ memory compression store: high-entropy and unique.
``duplicate`` and ``ff``
    Pages repeated within one machine, and all-0xFF pages.

With option ``images=DIR`` module images come from real PE files instead
(mapped as the loader maps them, with their real base relocations).

Every byte follows from (profile, size, seed) (and the PE files, if any):
per-page content is a
template page from a fixed pool chosen by a 64-bit hash of (object, page),
stamped with that hash at two hash-chosen words, so equal (object, page)
means equal bytes and different means different, and synthesis is a numpy
gather at memory speed. The mix and its sources: docs/synthetic-windows.md.
"""

from __future__ import annotations

import bisect
import functools
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mmh3
import numpy as np

from pagefusion.adapters.base import (
    PAGE_SIZE,
    Adapter,
    AdapterContext,
    GuestMemory,
    GuestModule,
    InvalidOptionError,
    InvalidSourceError,
    MemoryRange,
    ModuleRegion,
    SourceError,
)
from pagefusion.adapters.helpers import (
    MAX_TOTAL_BYTES,
    RangeLookup,
    give_back_buffer,
    open_allowed,
    page_aligned,
    parse_bool,
    parse_int,
    read_buffer,
    resolve_allowed,
)
from pagefusion.adapters.windows_profiles import PROFILES, ModuleSpec, Profile

__all__ = [
    "KIND_NAMES",
    "PROFILES",
    "Image",
    "Section",
    "SyntheticWindowsAdapter",
    "SyntheticWindowsMemory",
    "default_seed",
    "load_pe_images",
]

GiB = 1 << 30
MASK64 = (1 << 64) - 1
_WORDS = PAGE_SIZE // 8
_POOL_PAGES = 1024
_GOLDEN = 0x9E3779B97F4A7C15
_PAGES_PER_GIB = GiB // PAGE_SIZE
#: Machines above this size get QEMU's PC layout: RAM below 3 GiB, the rest from 4 GiB.
_LOW_MEMORY_PAGES = 3 * _PAGES_PER_GIB
_MIN_SIZE = 4 << 20

(ZERO, IMAGE_CODE, IMAGE_DATA, CACHE, PRIVATE, COMPRESSED, DUPLICATE, FF) = range(8)
KIND_NAMES = ("zero", "image", "image", "cache", "private", "compressed", "duplicate", "ff")
#: Distinct contents in a machine's pool of duplicated pages.
_DUPLICATE_SET = 48


# ---------------------------------------------------------------- hashing


def _key(*parts: object) -> int:
    """A 64-bit key of a tuple of names and numbers (stable across runs)."""
    return mmh3.hash64("\x1f".join(map(str, parts)).encode(), 0x5EED, signed=False)[0]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _page_hashes(key: int, pages: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix64(pages.astype(np.uint64) * np.uint64(_GOLDEN) ^ np.uint64(key))


def default_seed(machine_id: str) -> int:
    """The seed of a machine that names none: mmh3 of its id."""
    return _key("machine", machine_id) & ((1 << 63) - 1)


# ---------------------------------------------------------------- template pools

_pool_lock = threading.Lock()
_pools: dict[str, np.ndarray] = {}


def _pool(name: str) -> np.ndarray:
    """Template pages, (_POOL_PAGES, PAGE_SIZE) uint8, built once per process."""
    pool = _pools.get(name)
    if pool is not None:
        return pool
    with _pool_lock:
        if name in _pools:
            return _pools[name]
        rng = np.random.default_rng(_key("pool", name))
        if name in ("code", "random"):
            # Machine code and compressed data are both close to random bytes.
            pool = rng.integers(0, 256, (_POOL_PAGES, PAGE_SIZE), dtype=np.uint8)
        else:
            # Data pages: zero words, small integers, pointers and some noise.
            words = rng.integers(0, 1 << 63, (_POOL_PAGES, _WORDS), dtype=np.uint64)
            choice = rng.random((_POOL_PAGES, _WORDS))
            small = words & np.uint64(0xFF)
            pointer = (words & np.uint64(0x0000_0FFF_FFFF_FFF0)) | np.uint64(0xFFFF_F000_0000_0000)
            pool64 = np.where(choice < 0.40, np.uint64(0), words)
            pool64 = np.where((choice >= 0.40) & (choice < 0.65), small, pool64)
            pool64 = np.where((choice >= 0.65) & (choice < 0.85), pointer, pool64)
            pool = pool64.view(np.uint8).reshape(_POOL_PAGES, PAGE_SIZE)
        aligned = page_aligned(pool.nbytes).reshape(pool.shape)  # guest pages are page aligned
        aligned[:] = pool
        aligned.setflags(write=False)
        _pools[name] = aligned
        return aligned


_POOL_OF_KIND = {IMAGE_CODE: "code", IMAGE_DATA: "data", CACHE: "data", PRIVATE: "data",
                 COMPRESSED: "random", DUPLICATE: "data"}


def _fill(rows: np.ndarray, kind: int, key: int, pages: np.ndarray) -> None:
    """Write the content of object pages ``pages`` of (``kind``, ``key``) into ``rows``."""
    if kind == DUPLICATE:
        pages = _page_hashes(key, pages) % np.uint64(_DUPLICATE_SET)
    h = _page_hashes(key, pages)
    # mode="clip": the indices are in range by construction, and the default
    # mode buffers the whole output in a temporary (fresh memory, page faults).
    np.take(_pool(_POOL_OF_KIND[kind]), (h >> np.uint64(40)) % np.uint64(_POOL_PAGES), axis=0,
            out=rows, mode="clip")
    words = rows.view(np.uint64)
    n = np.arange(len(h))
    words[n, (h % np.uint64(_WORDS)).astype(np.intp)] = h
    words[n, ((h >> np.uint64(9)) % np.uint64(_WORDS)).astype(np.intp)] = ~h


# ---------------------------------------------------------------- images


@dataclass(frozen=True, slots=True)
class Section:
    """A section of a module image: ``pages`` pages from image page ``first``."""

    name: str
    first: int
    pages: int
    readonly: bool
    code: bool


def _image_key(arch: str, spec: ModuleSpec) -> int:
    return _key("image", arch, spec.name.lower(), spec.version)


@functools.lru_cache(maxsize=4096)
def _sections(spec: ModuleSpec, arch: str) -> tuple[Section, ...]:
    """The section table of an image, a fixed function of the image."""
    total = spec.size // PAGE_SIZE
    shares = [(".text", 0.58, True, True)]
    if spec.kernel:
        shares = [(".text", 0.40, True, True), ("PAGE", 0.18, True, True)]
    shares += [(".rdata", 0.16, True, False), (".data", 0.08, False, False)]
    if arch == "x64":
        shares.append((".pdata", 0.04, True, False))
    shares.append((".rsrc", 0.0, True, False))
    body = total - 2  # the header and .reloc take a page each
    sections = [Section("HEADER", 0, 1, True, False)]
    cursor = 1
    for name, share, readonly, code in shares:
        pages = int(body * share)
        if name == ".rsrc":
            pages = total - 1 - cursor
        if name == ".text":
            pages = max(pages, 1)
        if pages > 0 and cursor + pages <= total - 1:
            sections.append(Section(name, cursor, pages, readonly, code))
            cursor += pages
    sections.append(Section(".reloc", cursor, total - cursor, True, False))
    return tuple(s for s in sections if s.pages > 0)


@functools.lru_cache(maxsize=4096)
def _fixups(spec: ModuleSpec, arch: str, fraction: tuple[float, float]) -> tuple[
    np.ndarray, np.ndarray
]:
    """Byte offsets (sorted) of the image's relocation fixups and the RVAs they point to.

    x64 code is RIP-relative: fixups sit in pointer tables of .rdata/.data
    (runs of 8-byte pointers). x86 code embeds absolute addresses: fixups are
    scattered 4-byte words over most code pages.
    """
    key = _image_key(arch, spec)
    rng = np.random.default_rng(key)
    sections = _sections(spec, arch)
    total = spec.size // PAGE_SIZE
    share = fraction[0] + (fraction[1] - fraction[0]) * rng.random()
    wanted = max(1, round(share * total))
    priority = (".rdata", ".data", ".text", "PAGE") if arch == "x64" else (
        ".text", "PAGE", ".rdata", ".data"
    )
    ranked = {name: i for i, name in enumerate(priority)}
    groups = sorted((s for s in sections if s.name in ranked), key=lambda s: ranked[s.name])
    candidates = np.concatenate(
        [rng.permutation(np.arange(s.first, s.first + s.pages)) for s in groups]
        or [np.zeros(0, dtype=np.int64)]
    )
    pages = np.unique(np.concatenate([[0], candidates[: wanted - 1]])).astype(np.int64)
    if arch == "x64":
        counts = rng.integers(4, 48, pages.size)
        starts = rng.integers(0, _WORDS - counts + 1)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        offsets = np.repeat(pages * PAGE_SIZE + starts * 8, counts) + within * 8
    else:
        counts = rng.integers(8, 64, pages.size)
        offsets = np.repeat(pages * PAGE_SIZE, counts) + rng.integers(
            0, PAGE_SIZE // 4, counts.sum()
        ) * 4
    width = 8 if arch == "x64" else 4
    header = np.array([0x118 if width == 8 else 0x114], dtype=np.int64)  # OptionalHeader.ImageBase
    offsets = np.unique(np.concatenate([header, offsets.astype(np.int64)]))
    rvas = rng.integers(0, spec.size, offsets.size).astype(np.uint64)
    rvas[0] = 0  # ImageBase holds the base itself
    offsets.setflags(write=False)
    rvas.setflags(write=False)
    return offsets, rvas


def _header_page(spec: ModuleSpec, arch: str, sections: Sequence[Section]) -> np.ndarray:
    """A PE header page: MZ stub, PE signature, section names, zeros."""
    page = np.zeros(PAGE_SIZE, dtype=np.uint8)
    stub = b"MZ\x90\x00\x03" + bytes(55) + (0x100).to_bytes(4, "little")
    stub += b"\x0e\x1f\xba\x0e\x00\xb4\x09\xcd\x21\xb8\x01\x4c\xcd\x21"
    stub += b"This program cannot be run in DOS mode.\r\r\n$"
    page[: len(stub)] = np.frombuffer(stub, np.uint8)
    machine = 0x8664 if arch == "x64" else 0x14C
    pe = b"PE\x00\x00" + machine.to_bytes(2, "little") + len(sections).to_bytes(2, "little")
    pe += spec.size.to_bytes(4, "little") + _image_key(arch, spec).to_bytes(8, "little")
    page[0x100 : 0x100 + len(pe)] = np.frombuffer(pe, np.uint8)
    table = b"".join(
        s.name.encode()[:8].ljust(8, b"\0")
        + (s.pages * PAGE_SIZE).to_bytes(4, "little")
        + (s.first * PAGE_SIZE).to_bytes(4, "little")
        + bytes(24)
        for s in sections
    )
    page[0x208 : 0x208 + len(table)] = np.frombuffer(table, np.uint8)
    name = f"{spec.name} {spec.version}".encode()
    page[0x800 : 0x800 + len(name)] = np.frombuffer(name, np.uint8)
    page.setflags(write=False)
    return page


_header_page_cached = functools.lru_cache(maxsize=4096)(
    lambda spec, arch: _header_page(spec, arch, _sections(spec, arch))
)


@dataclass(frozen=True, slots=True, eq=False)
class Image:
    """A module image: synthesised (``pristine`` None) or read from a PE file.

    Attributes:
        spec: name, version, SizeOfImage (page multiple) and kernel or user.
        key: the content key of synthesised pages.
        sections: the section table, in image pages.
        offsets: byte offsets of relocation fixups, sorted.
        rvas: for each fixup, the value it holds minus the preferred base;
            loaded at ``base`` it holds ``base + rva`` (``width`` bytes).
        aligned: every fixup is aligned to ``width`` (a faster write path).
        pristine: the mapped image as (pages, PAGE_SIZE) bytes, for PE files.
    """

    spec: ModuleSpec
    key: int
    sections: tuple[Section, ...]
    offsets: np.ndarray
    rvas: np.ndarray
    width: int
    aligned: bool
    pristine: np.ndarray | None = None

    @property
    def fixup_pages(self) -> np.ndarray:
        """Image pages that hold at least one byte of a fixup."""
        first = self.offsets // PAGE_SIZE
        last = (self.offsets + self.width - 1) // PAGE_SIZE
        return np.union1d(first, last)


@functools.lru_cache(maxsize=4096)
def _synthetic_image(spec: ModuleSpec, arch: str, fraction: tuple[float, float]) -> Image:
    offsets, rvas = _fixups(spec, arch, fraction)
    return Image(spec, _image_key(arch, spec), _sections(spec, arch), offsets, rvas,
                 8 if arch == "x64" else 4, True)


# ---------------------------------------------------------------- real PE images

_IMAGE_SCN_CNT_CODE = 0x20
_IMAGE_SCN_MEM_EXECUTE = 0x20000000
_IMAGE_SCN_MEM_WRITE = 0x80000000
_MACHINES = {"x64": 0x8664, "x86": 0x14C}
_RELOC_WIDTH = {"x64": (10, 8), "x86": (3, 4)}  # IMAGE_REL_BASED_DIR64 / HIGHLOW
_PE_SUFFIXES = (".dll", ".exe", ".sys", ".drv", ".cpl", ".ocx", ".efi")
_pe_cache: dict[tuple[object, ...], Image] = {}
_pe_lock = threading.Lock()


def _pe_fail(name: str, message: str) -> InvalidSourceError:
    return InvalidSourceError(f"images: {name}: {message}", option="images")


def _pe_image(name: str, data: bytes, arch: str, profile: Profile) -> Image:
    """Map a PE file as the loader would and list its base relocations."""
    import pefile

    try:
        pe = pefile.PE(data=data, fast_load=True)
        pe.parse_data_directories(directories=[
            pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_BASERELOC"],
            pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_RESOURCE"],
        ])
        mapped = pe.get_memory_mapped_image()
    except Exception as exc:  # pefile raises PEFormatError and assorted others
        raise _pe_fail(name, f"not a usable PE image: {exc}") from None
    machine = pe.FILE_HEADER.Machine
    if machine != _MACHINES[arch]:
        raise _pe_fail(name, f"machine {machine:#x} is not the profile's {arch} "
                             f"({_MACHINES[arch]:#x})")
    size = -(-pe.OPTIONAL_HEADER.SizeOfImage // PAGE_SIZE) * PAGE_SIZE
    if not 0 < size <= GiB:
        raise _pe_fail(name, f"SizeOfImage {pe.OPTIONAL_HEADER.SizeOfImage} outside 1 byte..1 GiB")
    pages = size // PAGE_SIZE
    pristine = np.zeros(size, dtype=np.uint8)
    head = np.frombuffer(mapped, dtype=np.uint8)[:size]
    pristine[: head.size] = head

    sections: list[Section] = []
    table = sorted(pe.sections, key=lambda sec: sec.VirtualAddress)
    if table and all(sec.VirtualAddress % PAGE_SIZE == 0 for sec in table) and (
        table[0].VirtualAddress >= PAGE_SIZE
    ):
        sections.append(Section("HEADER", 0, table[0].VirtualAddress // PAGE_SIZE, True, False))
        for i, sec in enumerate(table):
            first = sec.VirtualAddress // PAGE_SIZE
            limit = table[i + 1].VirtualAddress // PAGE_SIZE if i + 1 < len(table) else pages
            extent = max(sec.Misc_VirtualSize, sec.SizeOfRawData, 1)
            count = min(-(-extent // PAGE_SIZE), limit - first, pages - first)
            if count <= 0:
                continue
            flags = sec.Characteristics
            sections.append(Section(
                sec.Name.rstrip(b"\0").decode("latin-1") or f"#{i}",
                first,
                count,
                not flags & _IMAGE_SCN_MEM_WRITE,
                bool(flags & (_IMAGE_SCN_CNT_CODE | _IMAGE_SCN_MEM_EXECUTE)),
            ))
    else:  # sections not page aligned (tiny images): one read-only run
        sections.append(Section("IMAGE", 0, pages, True, True))

    kind, width = _RELOC_WIDTH[arch]
    offsets_list: list[int] = []
    for block in getattr(pe, "DIRECTORY_ENTRY_BASERELOC", []):
        for entry in block.entries:
            if entry.type == 0:  # IMAGE_REL_BASED_ABSOLUTE: padding
                continue
            if entry.type != kind:
                raise _pe_fail(name, f"relocation type {entry.type} at {entry.rva:#x} is not "
                                     f"supported for {arch}")
            if not 0 <= entry.rva <= size - width:
                raise _pe_fail(name, f"relocation at {entry.rva:#x} lies outside the image")
            offsets_list.append(entry.rva)
    offsets = np.unique(np.asarray(offsets_list, dtype=np.int64))
    stored = np.array([int.from_bytes(pristine[o : o + width].tobytes(), "little")
                       for o in offsets.tolist()], dtype=np.uint64)
    mask = np.uint64((1 << (8 * width)) - 1)
    with np.errstate(over="ignore"):
        rvas = (stored - np.uint64(pe.OPTIONAL_HEADER.ImageBase)) & mask

    known = {spec.name.lower(): spec for spec in profile.modules}.get(name.lower())
    version = known.version if known else f"{profile.build}.0"
    fixed = getattr(pe, "VS_FIXEDFILEINFO", None)
    if fixed:
        info = fixed[0]
        text = (f"{info.FileVersionMS >> 16}.{info.FileVersionMS & 0xFFFF}."
                f"{info.FileVersionLS >> 16}.{info.FileVersionLS & 0xFFFF}")
        if len(text) <= 15:
            version = text
    kernel = known.kernel if known else name.lower().endswith(".sys")
    spec = ModuleSpec(known.name if known else name, version, size, kernel)
    pristine.setflags(write=False)
    offsets.setflags(write=False)
    rvas.setflags(write=False)
    return Image(
        spec,
        _key("pe", spec.name.lower(), version, size, mmh3.hash64(data, signed=False)[0]),
        tuple(sections),
        offsets,
        rvas,
        width,
        bool((offsets % width == 0).all()),
        pristine.reshape(pages, PAGE_SIZE),
    )


def load_pe_images(directory: str, context: AdapterContext, profile: Profile) -> tuple[Image, ...]:
    """Images from the PE files (.dll, .exe, .sys, ...) directly in ``directory``.

    Raises:
        InvalidOptionError: pefile is missing, or ``directory`` is not one.
        SourcePermissionError, SourceNotFoundError: as for any path option.
        InvalidSourceError: a file is not a PE image of the profile's
            architecture, or its relocations cannot be applied.
    """
    try:
        import pefile  # noqa: F401
    except ImportError:
        raise InvalidOptionError(
            "option 'images' needs the pefile package (pip install pefile)", option="images"
        ) from None
    root = resolve_allowed(directory, context.allowed_paths, "images")
    if not root.is_dir():
        raise InvalidOptionError(f"option 'images': {directory!r} is not a directory",
                                 option="images")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in _PE_SUFFIXES)
    if len(files) > 2048:
        raise InvalidOptionError("option 'images': more than 2048 PE files", option="images")
    out = []
    for path in files:
        fd = open_allowed(str(path), context.allowed_paths, "images")
        try:
            st = os.fstat(fd)
            if st.st_size > GiB:
                raise _pe_fail(path.name, "larger than 1 GiB")
            cache_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, path.name,
                         profile.name)
            with _pe_lock:
                image = _pe_cache.get(cache_key)
            if image is None:
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read()
                image = _pe_image(path.name, data, profile.arch, profile)
                with _pe_lock:
                    if len(_pe_cache) >= 4096:
                        _pe_cache.clear()
                    _pe_cache[cache_key] = image
        finally:
            os.close(fd)
        out.append(image)
    return tuple(out)


# ---------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True, eq=False)
class _Module:
    image: Image
    base: int


class _Chunks:
    """Chunks of objects before placement, as parallel lists."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.key: list[int] = []
        self.page0: list[int] = []
        self.pages: list[int] = []
        self.module: list[int] = []

    def add(self, kind: int, key: int, page0: int, pages: int, module: int = -1) -> None:
        self.kind.append(kind)
        self.key.append(key)
        self.page0.append(page0)
        self.pages.append(pages)
        self.module.append(module)

    def add_split(self, kind: int, key: int, pages: int, rng: np.random.Generator,
                  mean: int) -> None:
        """An object of ``pages`` pages cut into randomly sized chunks (scattered later)."""
        if pages <= 0:
            return
        sizes = rng.geometric(1.0 / mean, pages // max(1, mean // 4) + 2)
        ends = np.cumsum(sizes)
        ends = ends[ends < pages]
        starts = np.concatenate([[0], ends])
        lengths = np.diff(np.concatenate([starts, [pages]]))
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            self.add(kind, key, start, length)


def _bases(profile: Profile, modules: Sequence[ModuleSpec], seed: int, aslr: bool) -> list[int]:
    """Virtual load addresses: a per-boot random bias (one of 256) per address
    space, images packed from it at 64 KiB granularity, as Windows does."""
    x64 = profile.arch == "x64"
    kernel_slot = _key("kernel-bias", seed) % 256 if aslr else 0
    user_slot = _key("user-bias", seed) % 256 if aslr else 0
    kernel = (0xFFFFF800_00000000 + kernel_slot * 0x200000) if x64 else (
        0x80400000 + kernel_slot * 0x10000
    )
    user_top = 0x00007FFF_FFFF0000 if x64 else 0x7C000000
    user = user_top - user_slot * 0x10000
    out = []
    for spec in modules:
        span = -(-spec.size // 0x10000) * 0x10000
        if spec.kernel:
            out.append(kernel)
            kernel += span
        else:
            user -= span
            out.append(user)
    return out


class SyntheticWindowsMemory(GuestMemory):
    """The memory of one synthetic Windows guest (see the module docstring)."""

    live = False

    def __init__(
        self,
        profile: Profile,
        size: int,
        seed: int,
        aslr: bool | None = None,
        images: Sequence[Image] = (),
    ) -> None:
        self.profile = profile
        self.size = size
        self.seed = seed
        self.aslr = profile.aslr if aslr is None else aslr
        total_pages = size // PAGE_SIZE
        # Everything private to the machine is keyed by all three inputs.
        machine = (profile.name, size, seed)
        rng = np.random.default_rng(_key("layout", *machine))
        arch = profile.arch

        # How much is in use: the profile's working set, scaled down for
        # smaller machines; memory beyond it is zeroed free RAM.
        used = profile.working_set if size >= profile.default_size else int(
            profile.working_set * size / profile.default_size
        )
        used_pages = min(used // PAGE_SIZE, int(total_pages * 0.9))

        chunks = _Chunks()
        # Real PE images replace the profile's module of the same name; others join it.
        real = {image.spec.name.lower(): image for image in images}
        candidates = [
            real.pop(spec.name.lower())
            if spec.name.lower() in real
            else _synthetic_image(spec, arch, profile.fixup_pages)
            for spec in profile.modules
        ]
        candidates += real.values()
        chosen: list[Image] = []
        image_pages = 0
        for image in candidates:  # kernel first: small machines keep the core
            # Images take at most half of what is in use, but the kernel and the
            # real images a user supplied always load.
            limit = used_pages // 2 if chosen else max(used_pages // 2, total_pages // 2)
            forced = image.pristine is not None
            if not forced and image_pages + image.spec.size // PAGE_SIZE > limit:
                continue
            chosen.append(image)
            image_pages += image.spec.size // PAGE_SIZE
        bases = _bases(profile, [image.spec for image in chosen], seed, self.aslr)
        self._modules: list[_Module] = []
        for m, (image, base) in enumerate(zip(chosen, bases, strict=True)):
            for s in image.sections:
                kind = IMAGE_CODE if s.code else IMAGE_DATA
                if not s.readonly:  # run-time writes dirty half of each writable section
                    clean = s.pages - s.pages // 2
                    chunks.add(kind, image.key, s.first, clean, m)
                    if s.pages - clean:
                        dirty = _key("data", *machine, image.spec.name, s.name, s.first)
                        chunks.add(PRIVATE, dirty, 0, s.pages - clean)
                else:
                    chunks.add(kind, image.key, s.first, s.pages, m)
            self._modules.append(_Module(image, base))

        rest = max(0, used_pages - image_pages)
        cache_budget = int(rest * profile.cache_share)
        cached = 0
        order = rng.permutation(len(profile.cache_files))
        for i in order.tolist():
            name, file_size = profile.cache_files[i]
            if rng.random() < 0.1:
                continue  # not every machine has read every file
            pages = min(file_size // PAGE_SIZE, cache_budget - cached)
            if pages <= 0:
                break
            chunks.add_split(CACHE, _key("cache", profile.build, name.lower()), pages, rng, 64)
            cached += pages
        compressed = int(rest * profile.compressed_share)
        duplicate = int(rest * profile.dup_share)
        ff = int(rest * profile.ff_share)
        private = max(0, rest - cached - compressed - duplicate - ff)
        chunks.add_split(COMPRESSED, _key("compressed", *machine), compressed, rng, 32)
        chunks.add_split(DUPLICATE, _key("duplicate", *machine), duplicate, rng, 8)
        chunks.add_split(FF, 0, ff, rng, 4)
        chunks.add_split(PRIVATE, _key("private", *machine), private, rng, 64)

        # Scatter the chunks over guest-physical memory with zeroed gaps between.
        n = len(chunks.kind)
        order = rng.permutation(n)
        lengths = np.asarray(chunks.pages, dtype=np.int64)[order]
        zero = total_pages - int(lengths.sum())
        if zero < 0:
            raise InvalidOptionError(
                f"the module images need {int(lengths.sum()) * PAGE_SIZE} bytes, more than the "
                f"machine's {size}",
                option="images",
            )
        cuts = np.sort(rng.integers(0, zero + 1, n))
        gaps = np.diff(np.concatenate([[0], cuts, [zero]]))
        starts = np.cumsum(np.concatenate([[0], lengths[:-1]])) + np.cumsum(gaps[:-1])
        kinds = np.asarray(chunks.kind, dtype=np.int8)[order]
        keys = np.asarray(chunks.key, dtype=np.uint64)[order]
        page0 = np.asarray(chunks.page0, dtype=np.int64)[order]
        module = np.asarray(chunks.module, dtype=np.int32)[order]
        # Extents: the chunks plus the non-empty gaps as zero extents.
        gap_starts = np.concatenate([[0], starts + lengths])
        gap_lengths = gaps
        keep = gap_lengths > 0
        ext_start = np.concatenate([starts, gap_starts[keep]])
        sort = np.argsort(ext_start, kind="stable")
        self._ext_start = ext_start[sort]
        self._ext_len = np.concatenate([lengths, gap_lengths[keep]])[sort]
        self._ext_kind = np.concatenate([kinds, np.full(keep.sum(), ZERO, np.int8)])[sort]
        self._ext_key = np.concatenate([keys, np.zeros(keep.sum(), np.uint64)])[sort]
        self._ext_page0 = np.concatenate([page0, np.zeros(keep.sum(), np.int64)])[sort]
        self._ext_module = np.concatenate([module, np.full(keep.sum(), -1, np.int32)])[sort]
        self._ext_start_list = self._ext_start.tolist()

        if total_pages > _LOW_MEMORY_PAGES:
            high = (total_pages - _LOW_MEMORY_PAGES) * PAGE_SIZE
            self._ranges: tuple[MemoryRange, ...] = (
                MemoryRange(0, 3 * GiB), MemoryRange(4 * GiB, high)
            )
        else:
            self._ranges = (MemoryRange(0, size),)
        self._lookup = RangeLookup(self._ranges)
        self._buffer = np.empty(0, dtype=np.uint8)
        self._closed = False
        self._guest_modules = tuple(self._module_hints())

    # -- layout helpers

    def _physical(self, linear_page: int) -> int:
        if linear_page >= _LOW_MEMORY_PAGES:
            linear_page += _PAGES_PER_GIB
        return linear_page * PAGE_SIZE

    def _linear(self, address: int) -> int:
        page = address // PAGE_SIZE
        return page - _PAGES_PER_GIB if page >= _LOW_MEMORY_PAGES + _PAGES_PER_GIB else page

    def _extent_of(self, module: int, first: int) -> int:
        hits = np.flatnonzero((self._ext_module == module) & (self._ext_page0 == first))
        return int(hits[0])

    def _regions(self, linear: int, pages: int) -> list[ModuleRegion]:
        """Guest-physical regions of a linear run (split where it crosses the 3 GiB hole)."""
        out = []
        while pages:
            run = pages
            if linear < _LOW_MEMORY_PAGES < linear + pages:
                run = _LOW_MEMORY_PAGES - linear
            out.append(ModuleRegion(self._physical(linear), run * PAGE_SIZE))
            linear += run
            pages -= run
        return out

    def _module_hints(self) -> list[GuestModule]:
        out = []
        for m, mod in enumerate(self._modules):
            regions: list[ModuleRegion] = []
            for s in mod.image.sections:
                if not s.readonly:
                    continue
                e = self._extent_of(m, s.first)
                regions += self._regions(int(self._ext_start[e]), s.pages)
            out.append(GuestModule(
                module_name=mod.image.spec.name,
                version=mod.image.spec.version,
                base_address=mod.base,
                module_size=mod.image.spec.size,
                guest_os=self.profile.name,
                regions=tuple(regions[:32]),
            ))
        return out

    # -- introspection (tests, docs, demos)

    def mix(self) -> dict[str, int]:
        """Pages of each kind: zero, image, cache, private, compressed, duplicate, ff."""
        out = dict.fromkeys(dict.fromkeys(KIND_NAMES), 0)
        for kind, length in zip(self._ext_kind.tolist(), self._ext_len.tolist(), strict=True):
            out[KIND_NAMES[kind]] += length
        return out

    def module_sections(self, name: str) -> list[tuple[Section, int]]:
        """Sections of a loaded module with the guest-physical address of each (pristine
        part of .data only: the dirtied half lives elsewhere)."""
        for m, mod in enumerate(self._modules):
            if mod.image.spec.name == name:
                return [(s, self._physical(int(self._ext_start[self._extent_of(m, s.first)])))
                        for s in mod.image.sections]
        raise KeyError(name)

    def fixup_pages(self, name: str) -> np.ndarray:
        """Image page numbers of a module that carry relocation fixups."""
        for mod in self._modules:
            if mod.image.spec.name == name:
                return mod.image.fixup_pages
        raise KeyError(name)

    # -- GuestMemory

    def ranges(self) -> Sequence[MemoryRange]:
        return self._ranges

    def modules(self) -> Sequence[GuestModule]:
        return self._guest_modules

    def read(self, address: int, length: int) -> memoryview:
        if self._closed:
            raise SourceError("synthetic guest memory is closed")
        self._lookup.find(address, length)
        if self._buffer.size < length:
            self._buffer = read_buffer(length)
        out = self._buffer[:length].reshape(-1, PAGE_SIZE)
        self.synthesize(self._linear(address), out)
        return memoryview(self._buffer[:length].data)

    def synthesize(self, first_page: int, out: np.ndarray) -> None:
        """Fill ``out`` (pages x PAGE_SIZE uint8) with linear pages from ``first_page``."""
        end_page = first_page + out.shape[0]
        i = bisect.bisect_right(self._ext_start_list, first_page) - 1
        while i < len(self._ext_start_list) and self._ext_start_list[i] < end_page:
            start = self._ext_start_list[i]
            length = int(self._ext_len[i])
            a = max(first_page, start)
            b = min(end_page, start + length)
            i += 1
            if a >= b:
                continue
            rows = out[a - first_page : b - first_page]
            kind = int(self._ext_kind[i - 1])
            if kind == ZERO:
                rows.fill(0)
                continue
            if kind == FF:
                rows.fill(0xFF)
                continue
            obj0 = int(self._ext_page0[i - 1]) + (a - start)
            m = int(self._ext_module[i - 1])
            image = self._modules[m].image if m >= 0 else None
            if image is not None and image.pristine is not None:
                rows[:] = image.pristine[obj0 : obj0 + (b - a)]
            else:
                pages = np.arange(obj0, obj0 + (b - a), dtype=np.int64)
                _fill(rows, kind, int(self._ext_key[i - 1]), pages)
            if m >= 0:
                self._relocate(rows, self._modules[m], obj0, b - a)

    def _relocate(self, rows: np.ndarray, mod: _Module, obj0: int, pages: int) -> None:
        image = mod.image
        if obj0 == 0 and image.pristine is None:
            rows[0] = _header_page_cached(image.spec, self.profile.arch)
        start = obj0 * PAGE_SIZE
        end = start + pages * PAGE_SIZE
        # A fixup that starts on the page before may spill into this span.
        lo, hi = np.searchsorted(image.offsets, [start - image.width + 1, end])
        if lo == hi:
            return
        where = image.offsets[lo:hi] - start
        with np.errstate(over="ignore"):
            values = image.rvas[lo:hi] + np.uint64(mod.base)
        flat = rows.reshape(-1)
        if image.aligned:
            if image.width == 8:
                flat.view(np.uint64)[where >> 3] = values
            else:
                flat.view(np.uint32)[where >> 2] = (values & np.uint64(0xFFFFFFFF)).astype(
                    np.uint32
                )
            return
        for k in range(image.width):  # unaligned fixups (x86 code), maybe across pages
            at = where + k
            inside = (at >= 0) & (at < end - start)
            flat[at[inside]] = ((values[inside] >> np.uint64(8 * k)) & np.uint64(0xFF)).astype(
                np.uint8
            )

    def idle(self) -> None:
        # A running guest keeps no read buffer (it matters with dozens of
        # guests); the next reader takes it as the spare.
        give_back_buffer(self._buffer)
        self._buffer = np.empty(0, dtype=np.uint8)

    def close(self) -> None:
        self._closed = True
        self._buffer = np.empty(0, dtype=np.uint8)  # not given back: see ShmGuestMemory.close


class SyntheticWindowsAdapter(Adapter):
    """Synthetic Windows guests, byte-identical for equal (profile, size, seed)."""

    name = "synthetic-windows"
    options = {
        "profile": "OS profile: " + ", ".join(PROFILES) + " (default: the machine's os_type)",
        "seed": "integer seed of this boot (default: derived from the machine id)",
        "aslr": "true/false: per-boot random image bases (default: on from Windows 7)",
        "images": "directory of real PE files (needs pefile): they replace the profile's "
        "modules of the same name, others are added; their real relocations are applied",
    }

    def open(self, options: Mapping[str, str], context: AdapterContext) -> GuestMemory:
        name = options.get("profile") or context.os_type
        profile = PROFILES.get(name)
        if profile is None:
            raise InvalidOptionError(
                f"unknown profile {name!r} (known: {', '.join(PROFILES)}); set option 'profile' "
                "or a Windows os_type",
                option="profile",
            )
        seed = parse_int(options, "seed", default_seed(context.machine_id))
        if not 0 <= seed <= MASK64:
            raise InvalidOptionError("option 'seed' must be between 0 and 2**64-1", option="seed")
        aslr = parse_bool(options, "aslr", profile.aslr)
        size = context.memory_size_bytes or profile.default_size
        if size % PAGE_SIZE or size < _MIN_SIZE or size > MAX_TOTAL_BYTES:
            raise InvalidOptionError(
                f"memory_size_bytes {size} must be a multiple of {PAGE_SIZE} between "
                f"{_MIN_SIZE} and {MAX_TOTAL_BYTES}",
                option="memory_size_bytes",
            )
        images = load_pe_images(options["images"], context, profile) if options.get(
            "images"
        ) else ()
        return SyntheticWindowsMemory(profile, size, seed, aslr, images)
