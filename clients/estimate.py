"""``pagefusion estimate``: what page fusion would save, before turning it on.

Offline: no server and no frame pool. Each machine's source is opened
through the same adapters the server uses and read once, in the engine's
own batches; every page is hashed with a keyed mmh3 x64 128-bit hash, and
only the hashes of non-zero pages are kept (16 bytes, plus a 4-byte batch
number: 20 bytes per non-zero page, against the 4,096 a server holds). The
hashes are bucketed by their top byte and sorted, so equal pages meet, and
the engine's rules are replayed on the sorted runs:

* zero pages are elided; machines without ``page_fusion_enabled`` back each
  other page with a frame of its own (duplicates inside them too);
* the others share one frame per content within their ``fusion_domain``;
* a frame takes at most 65,535 users (``MAX_REFCOUNT``). Contents with more
  copies are replayed batch by batch as ingest does it: a batch's copies
  join the oldest indexed frame with room for all of them, else start a new
  indexed frame; copies beyond 65,535 in one batch fill frames of their own;
  a saturated frame passed over leaves the index. In a server started
  fresh, frame ids grow with time, so the index's candidate order is the
  order in which frames were made, which is what the replay uses;
* machines start in the order of the SPEC files, as ``pagefusion startvm``
  would start them.

Equal 128-bit keyed hashes stand in for equal bytes. With ``n`` distinct
non-zero pages the chance that any two different pages collide (which would
overstate sharing by one page) is at most ``n**2 / 2**129``: below
``2**-73`` for a terabyte of distinct pages. The server itself never trusts
a hash (it compares bytes); the one case where it would differ from this
estimate without a collision here is two different pages of one ingest
batch with equal first 64 bits of the server's secret-seeded hash, which
keep separate frames (chance at most ``batches * 2**-37``).

The same sorted runs give the sharing between each pair of machines (the
distinct contents they have in common: the frames that hosting them
together in one domain saves beyond hosting each alone), the savings under
other policies (everything in one domain, zero pages only, the hint path
alone as a guest agent would drive it) and, with ``hosts``, a placement of
the machines onto hosts (greedy by marginal frames, then replayed exactly).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import mmh3
import numpy as np

from pagefusion.adapters.base import AdapterContext, GuestMemory, MemoryRange

PAGE_SIZE = 4096
#: Buckets the hashes are partitioned into by their top bits: the sort and
#: the replay work on one bucket at a time, so their temporaries stay small.
BUCKET_BITS = 6
BUCKETS = 1 << BUCKET_BITS
_BUCKET_SHIFT = np.uint64(64 - BUCKET_BITS)
#: Records the replay takes at once: consecutive buckets are fed together up
#: to a 64th of all records (so its temporaries stay a few bytes per page),
#: but at least FEED_MIN (so small estimates pay few numpy calls) and at
#: most FEED_MAX (bounded temporaries, about 100 bytes a record).
FEED_MIN = 1 << 13
FEED_MAX = 1 << 20
#: Where the offline estimate may open files: the operator's own machine,
#: so the operator's file permissions are the only limit.
OPEN_ROOTS = (Path("/"),)

__all__ = [
    "EstimateError",
    "MachineSpec",
    "Partial",
    "estimate",
    "format_estimate",
    "load_specs",
    "merge_partials",
    "scan_source",
]


class EstimateError(Exception):
    """A SPEC or a source the estimate cannot use; the message says which and why."""


def _engine_constants() -> tuple[int, int, int]:
    # The engine's own numbers, so the replay follows it if they change.
    from pagefusion.server.engine.engine import BATCH_PAGES
    from pagefusion.server.engine.pool import CHUNK_FRAMES, MAX_REFCOUNT

    return BATCH_PAGES, MAX_REFCOUNT, CHUNK_FRAMES


BATCH_PAGES, MAX_REFCOUNT, CHUNK_FRAMES = _engine_constants()


# -- specs ----------------------------------------------------------------------


@dataclass(frozen=True)
class MachineSpec:
    """One machine of a SPEC file, as CreateMachine would define it."""

    machine_id: str
    adapter: str
    options: Mapping[str, str] = field(default_factory=dict)
    os_type: str = ""
    memory_size_bytes: int = 0
    page_fusion: bool = False
    domain: str = "default"
    display_name: str = ""

    @property
    def name(self) -> str:
        """The resource name a server shows."""
        return f"machines/{self.machine_id}"


def load_specs(paths: Sequence[str | os.PathLike[str]]) -> list[MachineSpec]:
    """Read SPEC files: each a JSON list of ``CreateMachineRequest`` objects.

    Field names may be the protos' (``machine_id``) or their JSON names
    (``machineId``), as grpcurl sends them. A single object is accepted too.

    Raises:
        EstimateError: unreadable file, bad JSON, unknown field, invalid or
            repeated machine id, missing memory source.
    """
    from google.protobuf.json_format import ParseDict, ParseError

    from pagefusion.clients.resources import is_valid_machine_id
    from pagefusion.v1 import machine_pb2

    specs: list[MachineSpec] = []
    seen: set[str] = set()
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise EstimateError(f"cannot read SPEC {os.fspath(path)!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise EstimateError(f"SPEC {os.fspath(path)!r} is not JSON: {exc}") from None
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            where = f"SPEC {os.fspath(path)!r} item {i}"
            if not isinstance(item, dict):
                raise EstimateError(f"{where}: expected an object like CreateMachineRequest")
            try:
                request = ParseDict(item, machine_pb2.CreateMachineRequest())
            except ParseError as exc:
                raise EstimateError(f"{where}: {exc}") from None
            machine_id = request.machine_id
            if not is_valid_machine_id(machine_id):
                raise EstimateError(
                    f"{where}: machine_id {machine_id[:128]!r} is not a valid id (lowercase "
                    "letters, digits and '-', 1 to 63 characters, starting with a letter)"
                )
            if machine_id in seen:
                raise EstimateError(f"{where}: machine_id {machine_id!r} appears twice")
            seen.add(machine_id)
            machine = request.machine
            if not machine.memory_source.adapter:
                raise EstimateError(f"{where}: machine.memory_source.adapter is required")
            if machine.memory_size_bytes % PAGE_SIZE:
                raise EstimateError(
                    f"{where}: machine.memory_size_bytes must be a multiple of {PAGE_SIZE}"
                )
            specs.append(
                MachineSpec(
                    machine_id=machine_id,
                    adapter=machine.memory_source.adapter,
                    options=dict(machine.memory_source.options),
                    os_type=machine.os_type,
                    memory_size_bytes=machine.memory_size_bytes,
                    page_fusion=machine.page_fusion_enabled,
                    domain=machine.fusion_domain or "default",
                    display_name=machine.display_name,
                )
            )
    if not specs:
        raise EstimateError("the SPEC files name no machine")
    return specs


def open_spec(spec: MachineSpec, adapters: Mapping[str, Any] | None = None) -> GuestMemory:
    """Open a machine's source as the server would (same adapters, same checks).

    Raises:
        EstimateError: the adapter refused (the message names the option).
    """
    from pagefusion.adapters.base import AdapterError
    from pagefusion.adapters.registry import open_source

    context = AdapterContext(
        machine_id=spec.machine_id,
        os_type=spec.os_type,
        memory_size_bytes=spec.memory_size_bytes,
        allowed_paths=OPEN_ROOTS,
    )
    try:
        return open_source(spec.adapter, spec.options, context, adapters)
    except AdapterError as exc:
        option = f" (option {exc.option!r})" if exc.option else ""
        raise EstimateError(f"machine {spec.machine_id!r}: {exc}{option}") from None


# -- reading and hashing --------------------------------------------------------


def hash_pages(buf: memoryview, pages: int, seed: int) -> np.ndarray:
    """Keyed mmh3 x64 128-bit hashes of ``pages`` 4 KiB pages, as (pages, 2) uint64."""
    digest = mmh3.mmh3_x64_128_digest
    end = pages * PAGE_SIZE
    out = b"".join([digest(buf[i : i + PAGE_SIZE], seed) for i in range(0, end, PAGE_SIZE)])
    return np.frombuffer(out, dtype=np.uint64).reshape(-1, 2)


def zero_hash(seed: int) -> tuple[np.uint64, np.uint64]:
    """The hash of the zero page: pages hashing to it are zero pages."""
    h = np.frombuffer(mmh3.mmh3_x64_128_digest(bytes(PAGE_SIZE), seed), dtype=np.uint64)
    return h[0], h[1]


@dataclass
class Registration:
    """A module a guest agent would register successfully, as flat page runs."""

    key: tuple[Any, ...]  # the engine's module identity (pagefusion.server.engine.modules)
    regions: list[np.ndarray]  # per region: flat guest page indices


@dataclass
class MachineScan:
    """What one machine's read left: counts, batch sizes and its hint-path pages."""

    spec: MachineSpec
    guest_pages: int
    zero_pages: int
    live: bool
    batch_nonzero: np.ndarray  # non-zero pages per ingest batch, in order (int64)
    registrations: list[Registration] = field(default_factory=list)
    module_pages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    module_hashes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))
    module_rank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    registration_bytes: int = 0  # what the registrations cost the engine's registry
    seconds: float = 0.0

    @property
    def nonzero_pages(self) -> int:
        return self.guest_pages - self.zero_pages

    @property
    def batches(self) -> int:
        return len(self.batch_nonzero)


@dataclass
class Partial:
    """Sorted page hashes of consecutive machines (one source, or a merge of several).

    ``buckets[b]`` holds (hi, lo, batch) of every non-zero page whose hash
    has top bits ``b``, sorted by (hi, lo, batch); ``batch`` counts the
    ingest batches from this partial's first machine.
    """

    machines: list[MachineScan]
    buckets: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]
    #: False: each bucket is in batch order instead (a local estimate sorts
    #: once, when it replays; a cluster sorts on the workers and merges).
    ordered: bool = True

    @property
    def batches(self) -> int:
        return sum(m.batches for m in self.machines)

    @property
    def nbytes(self) -> int:
        """Memory the hashes take (what the 24-bytes-per-page budget counts)."""
        total = 0
        for bucket in self.buckets:
            if bucket is not None:
                total += sum(a.nbytes for a in bucket)
        for m in self.machines:
            total += m.module_pages.nbytes + m.module_hashes.nbytes + m.module_rank.nbytes
        return total


def _sort_records(
    hi: np.ndarray, lo: np.ndarray, batch: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort records by (hi, lo, batch); input is in batch order within equal keys.

    A stable sort by ``hi`` keeps batch order among equal pages; timsort
    merges already sorted runs (the inputs of a merge) in linear time. Two
    different pages with equal ``hi`` (a 64-bit collision) are put in order
    by ``lo`` afterwards, one run at a time.
    """
    order = np.argsort(hi, kind="stable")
    hi, lo, batch = hi[order], lo[order], batch[order]
    if len(hi) > 1:
        mixed = np.flatnonzero((hi[1:] == hi[:-1]) & (lo[1:] != lo[:-1]))
        for value in np.unique(hi[mixed]).tolist():
            run = np.flatnonzero(hi == np.uint64(value))
            sub = np.lexsort((batch[run], lo[run]))
            lo[run], batch[run] = lo[run][sub], batch[run][sub]
    return hi, lo, batch


def _registrations(
    memory: GuestMemory, ranges: Sequence[MemoryRange], spec: MachineSpec
) -> tuple[list[Registration], int]:
    """The modules a guest agent's first cycle would register, as the engine checks them.

    Mirrors clients/guest_agent.py (modules deduplicated by name, version,
    base and size; refusals skipped) and FusionEngine.register_module
    (limits, regions inside the machine's memory, one module per base, at
    most MAX_MODULES_PER_MACHINE).
    """
    from pagefusion.server.engine.errors import EngineError
    from pagefusion.server.engine.modules import MAX_MODULES_PER_MACHINE, module_key, region_pages

    if not spec.page_fusion:
        return [], 0  # the agent finds page sharing disabled and registers nothing
    starts = [r.address for r in ranges]
    offsets = np.cumsum([0] + [r.pages for r in ranges]).tolist()

    def span(first: int, count: int) -> np.ndarray | None:
        out = np.empty(count, dtype=np.int64)
        page, last = first, first + count
        while page < last:
            i = bisect.bisect_right(starts, page * PAGE_SIZE) - 1
            if i < 0 or page * PAGE_SIZE >= ranges[i].end:
                return None
            run_end = min(last, ranges[i].end // PAGE_SIZE)
            base = offsets[i] + page - ranges[i].address // PAGE_SIZE
            out[page - first : run_end - first] = np.arange(base, base + run_end - page)
            page = run_end
        return out

    current = {(m.module_name, m.version, m.base_address, m.module_size): m
               for m in memory.modules()}
    by_base: dict[int, tuple[Any, ...]] = {}
    out: list[Registration] = []
    cost = 0
    for module in current.values():
        try:
            key = module_key(module)
        except EngineError:
            continue
        regions = []
        for region in module.regions:
            pages = span(region.address // PAGE_SIZE, region_pages(region.address, region.size))
            if pages is None:
                break
            regions.append(pages)
        else:
            if module.base_address in by_base or len(by_base) >= MAX_MODULES_PER_MACHINE:
                continue
            by_base[module.base_address] = key
            out.append(Registration(key, regions))
            cost += sum(p.nbytes for p in regions)
    return out, cost


def scan_source(
    spec: MachineSpec,
    seed: int,
    *,
    adapters: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    memory: GuestMemory | None = None,
    ordered: bool = True,
) -> Partial:
    """Read one machine's source and keep its non-zero pages' hashes, sorted.

    Args:
        spec: the machine.
        seed: the hash seed; every source of one estimate uses the same.
        adapters: loaded adapters (default: discovered now).
        progress: called with the pages read since the last call.
        memory: the source, already opened with :func:`open_spec` (closed here).
        ordered: sort each bucket now (for merges); else keep batch order.
    """
    started = time.perf_counter()
    if memory is None:
        memory = open_spec(spec, adapters)
    try:
        ranges = list(memory.ranges())
        live = bool(getattr(memory, "live", False))
        registrations, registration_bytes = _registrations(memory, ranges, spec)
        if registrations:
            module_pages = np.unique(np.concatenate([p for r in registrations for p in r.regions]))
        else:
            module_pages = np.zeros(0, dtype=np.int64)
        module_hashes = np.zeros((len(module_pages), 2), dtype=np.uint64)
        module_rank = np.full(len(module_pages), -1, dtype=np.int64)
        z0, z1 = zero_hash(seed)
        chunks: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(BUCKETS)]
        chunk_batches: list[list[int]] = [[] for _ in range(BUCKETS)]
        batch_nonzero: list[int] = []
        flat = 0
        nonzero_before = 0
        for r in ranges:
            for first in range(0, r.pages, BATCH_PAGES):
                n = min(BATCH_PAGES, r.pages - first)
                address = r.address + first * PAGE_SIZE
                try:
                    buf = memory.read(address, n * PAGE_SIZE)
                except Exception as exc:
                    raise EstimateError(
                        f"machine {spec.machine_id!r}: reading {n * PAGE_SIZE} bytes at "
                        f"{address:#x} failed: {exc}"
                    ) from None
                view = memoryview(buf).cast("B")
                if len(view) != n * PAGE_SIZE:
                    raise EstimateError(
                        f"machine {spec.machine_id!r}: the source returned {len(view)} bytes "
                        f"at {address:#x}, expected {n * PAGE_SIZE}"
                    )
                h = hash_pages(view, n, seed)
                nonzero = (h[:, 0] != z0) | (h[:, 1] != z1)
                batch = len(batch_nonzero)
                count = int(np.count_nonzero(nonzero))
                batch_nonzero.append(count)
                if len(module_pages):
                    lo_i, hi_i = np.searchsorted(module_pages, [flat, flat + n])
                    if hi_i > lo_i:
                        local = module_pages[lo_i:hi_i] - flat
                        module_hashes[lo_i:hi_i] = h[local]
                        rank = np.cumsum(nonzero) - 1
                        module_rank[lo_i:hi_i] = np.where(
                            nonzero[local], nonzero_before + rank[local], -1
                        )
                if count:
                    kept = h[nonzero]
                    hi = kept[:, 0]
                    bucket = (hi >> _BUCKET_SHIFT).astype(np.uint8)
                    order = np.argsort(bucket, kind="stable")  # radix sort: one byte
                    bounds = np.zeros(BUCKETS + 1, dtype=np.int64)
                    np.cumsum(np.bincount(bucket, minlength=BUCKETS), out=bounds[1:])
                    kept = kept[order]
                    for b in np.flatnonzero(np.diff(bounds)).tolist():
                        part = kept[bounds[b] : bounds[b + 1]]
                        chunks[b].append((part[:, 0].copy(), part[:, 1].copy()))
                        chunk_batches[b].append(batch)
                flat += n
                nonzero_before += count
                if progress is not None:
                    progress(n)
        buckets: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
        for b in range(BUCKETS):
            parts = chunks[b]
            if not parts:
                empty = np.zeros(0, dtype=np.uint64)
                buckets.append((empty, empty.copy(), np.zeros(0, dtype=np.uint32)))
                continue
            hi = np.concatenate([p[0] for p in parts])
            lo = np.concatenate([p[1] for p in parts])
            batch_ids = np.repeat(
                np.array(chunk_batches[b], dtype=np.uint32), [len(p[0]) for p in parts]
            )
            chunks[b] = []
            buckets.append(_sort_records(hi, lo, batch_ids) if ordered else (hi, lo, batch_ids))
        guest = flat
        scan = MachineScan(
            spec=spec,
            guest_pages=guest,
            zero_pages=guest - nonzero_before,
            live=live,
            batch_nonzero=np.array(batch_nonzero, dtype=np.int64),
            registrations=registrations,
            module_pages=module_pages,
            module_hashes=module_hashes,
            module_rank=module_rank,
            registration_bytes=registration_bytes,
            seconds=time.perf_counter() - started,
        )
        return Partial([scan], buckets, ordered)
    finally:
        idle = getattr(memory, "idle", None)
        if idle is not None:
            with contextlib.suppress(Exception):  # optional in the interface; never fatal
                idle()
        memory.close()


def _bucket_of(
    partials: Sequence[Partial], first: int, last: int, release: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Buckets ``first`` to ``last`` (inclusive) of consecutive partials, merged and sorted.

    Batches count from the first partial's first machine. Consecutive
    buckets hold consecutive ranges of ``hi``, so they simply follow each
    other.
    """
    his, los, batches = [], [], []
    offset = 0
    for p in partials:
        for b in range(first, last + 1):
            bucket = p.buckets[b]
            assert bucket is not None, "bucket already released"
            hi, lo, batch = bucket
            his.append(hi)
            los.append(lo)
            batches.append(batch + np.uint32(offset) if offset else batch)
            if release:
                p.buckets[b] = None
        offset += p.batches
    if len(his) == 1 and partials[0].ordered:
        return his[0], los[0], batches[0]
    return _sort_records(np.concatenate(his), np.concatenate(los), np.concatenate(batches))


def _records(partial: Partial, b: int) -> int:
    bucket = partial.buckets[b]
    return 0 if bucket is None else len(bucket[0])


def _feeds(partials: Sequence[Partial]) -> list[tuple[int, int]]:
    """Runs of consecutive buckets to feed the replay at once (see FEED_MIN)."""
    sizes = [sum(_records(p, b) for p in partials) for b in range(BUCKETS)]
    feed = min(max(sum(sizes) // 64, FEED_MIN), FEED_MAX)
    runs, start, held = [], 0, 0
    for b, size in enumerate(sizes):
        held += size
        if held >= feed or b == BUCKETS - 1:
            runs.append((start, b))
            start, held = b + 1, 0
    return runs


def merge_partials(first: Partial, second: Partial) -> Partial:
    """The partial of ``first``'s machines followed by ``second``'s (a tree-reduction step)."""
    pair = [first, second]
    buckets: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [
        _bucket_of(pair, b, b, release=False) for b in range(BUCKETS)
    ]
    return Partial(first.machines + second.machines, buckets)


# -- the replay -----------------------------------------------------------------


@dataclass
class Scenario:
    """One way of hosting the machines: which share with which, on which host.

    ``pool_of[m]`` is the fusion pool of machine ``m`` (machines of one pool
    share frames: same host and domain, page fusion on), -1 for a machine
    without page fusion; ``host_of[m]`` its host.
    """

    name: str
    pool_of: np.ndarray
    host_of: np.ndarray
    hosts: int
    pool_host: np.ndarray
    frames: np.ndarray = field(init=False)
    frames_shared: np.ndarray = field(init=False)
    indexed: np.ndarray = field(init=False)
    last_insert: np.ndarray = field(init=False)
    shared_pages: np.ndarray = field(init=False)
    new_frames: np.ndarray = field(init=False)
    removals: list[tuple[int, int]] = field(default_factory=list)

    def start(self, machines: int, batches: int) -> None:
        self.frames = np.zeros(self.hosts, dtype=np.int64)
        self.frames_shared = np.zeros(self.hosts, dtype=np.int64)
        self.indexed = np.zeros(self.hosts, dtype=np.int64)
        self.last_insert = np.full(self.hosts, -1, dtype=np.int64)
        self.shared_pages = np.zeros(machines, dtype=np.int64)
        self.new_frames = np.zeros(batches, dtype=np.int64)


def make_scenario(
    name: str,
    machines: Sequence[MachineSpec],
    host_of: Sequence[int],
    hosts: int,
    *,
    fusion: bool | None = None,
    one_domain: bool = False,
) -> Scenario:
    """A scenario: machines on ``host_of`` hosts; ``fusion``/``one_domain`` override settings."""
    pools: dict[tuple[int, str], int] = {}
    pool_of = np.full(len(machines), -1, dtype=np.int32)
    for i, spec in enumerate(machines):
        on = spec.page_fusion if fusion is None else fusion
        if on:
            key = (int(host_of[i]), "default" if one_domain else spec.domain)
            pool_of[i] = pools.setdefault(key, len(pools))
    pool_host = np.zeros(max(len(pools), 1), dtype=np.int64)
    for (host, _), pool in pools.items():
        pool_host[pool] = host
    return Scenario(name, pool_of, np.asarray(host_of, dtype=np.int64), hosts, pool_host)


class Replay:
    """Replays ingest on sorted buckets for several scenarios at once."""

    def __init__(
        self,
        machines: Sequence[MachineScan],
        scenarios: Sequence[Scenario],
        *,
        pairs: bool = True,
        content_ids: bool = False,
    ) -> None:
        self.machines = list(machines)
        self.scenarios = list(scenarios)
        self.batch_machine = np.repeat(
            np.arange(len(machines), dtype=np.int32), [m.batches for m in machines]
        )
        total_batches = len(self.batch_machine)
        for s in self.scenarios:
            s.start(len(machines), total_batches)
        count = len(machines)
        self.pairs = np.zeros((count, count), dtype=np.int64) if pairs else None
        self.distinct = np.zeros(count, dtype=np.int64)
        self.content_ids: list[list[np.ndarray]] | None = (
            [[] for _ in range(count)] if content_ids else None
        )
        self._next_content = 0

    def feed(self, hi: np.ndarray, lo: np.ndarray, batch: np.ndarray) -> None:
        """One bucket: (hi, lo, batch) sorted by (hi, lo, batch), batches global."""
        n = len(hi)
        if not n:
            return
        mach = self.batch_machine[batch]
        new = np.empty(n, dtype=bool)
        new[0] = True
        np.not_equal(hi[1:], hi[:-1], out=new[1:])
        new[1:] |= lo[1:] != lo[:-1]
        cid = np.cumsum(new, dtype=np.int32) - 1
        contents = int(cid[-1]) + 1
        self._machine_sets(cid, mach, contents)
        for s in self.scenarios:
            self._scenario(s, cid, mach, batch)
        self._next_content += contents

    def _machine_sets(self, cid: np.ndarray, mach: np.ndarray, contents: int) -> None:
        count = len(self.machines)
        key = cid.astype(np.int64) * count + mach  # sorted: a content's pages in machine order
        first = np.empty(len(key), dtype=bool)
        first[0] = True
        np.not_equal(key[1:], key[:-1], out=first[1:])
        pc, pm = cid[first], mach[first]
        self.distinct += np.bincount(pm, minlength=count)
        if self.content_ids is not None:
            order = np.argsort(pm, kind="stable")
            bounds = np.searchsorted(pm[order], np.arange(count + 1))
            ids = pc[order].astype(np.int64) + self._next_content
            for m in range(count):
                if bounds[m + 1] > bounds[m]:
                    self.content_ids[m].append(ids[bounds[m] : bounds[m + 1]])
        if self.pairs is None or count < 2:
            return
        machines_of = np.bincount(pc, minlength=contents)
        multi = np.flatnonzero(machines_of[pc] >= 2)
        if not len(multi):
            return
        rows = pc[multi]
        cols = pm[multi]
        rank = np.cumsum(np.r_[True, rows[1:] != rows[:-1]]) - 1
        block = 8192
        for start in range(0, int(rank[-1]) + 1, block):
            sel = (rank >= start) & (rank < start + block)
            dense = np.zeros((block, count), dtype=np.float32)
            dense[rank[sel] - start, cols[sel]] = 1.0
            self.pairs += np.rint(dense.T @ dense).astype(np.int64)

    def _scenario(self, s: Scenario, cid: np.ndarray, mach: np.ndarray, batch: np.ndarray) -> None:
        pools = int(s.pool_of.max()) + 1
        if pools <= 0:
            return  # nothing fuses: every non-zero page has a frame of its own
        pool = s.pool_of[mach]
        if pools == 1 and bool(s.pool_of.min() >= 0):
            idx = None  # every page, already grouped by content
            g_cid = cid
        else:
            if pools < 0xFFFF:  # a stable sort of 16-bit keys is a radix sort: linear
                order = np.argsort((pool + 1).astype(np.uint16), kind="stable")
            else:
                order = np.argsort(pool, kind="stable")
            idx = order[np.count_nonzero(pool < 0) :]
            g_cid = cid[idx]
        n = len(g_cid)
        if not n:
            return
        edge = np.empty(n, dtype=bool)
        edge[0] = True
        np.not_equal(g_cid[1:], g_cid[:-1], out=edge[1:])
        if idx is not None and pools > 1:
            p_sorted = pool[idx]
            edge[1:] |= p_sorted[1:] != p_sorted[:-1]
        start = np.flatnonzero(edge)
        size = np.diff(np.append(start, n))
        first = start if idx is None else idx[start]
        g_host = s.pool_host[pool[first]]
        g_batch = batch[first]
        light = size <= MAX_REFCOUNT
        if light.all():
            lg_host, lg_batch, lg_size = g_host, g_batch, size
        else:
            lg_host, lg_batch, lg_size = g_host[light], g_batch[light], size[light]
        made = np.bincount(lg_host, minlength=s.hosts)
        s.frames += made
        s.indexed += made
        s.frames_shared += np.bincount(lg_host[lg_size >= 2], minlength=s.hosts)
        for h in np.flatnonzero(made).tolist():
            s.last_insert[h] = max(int(s.last_insert[h]), int(lg_batch[lg_host == h].max()))
        s.new_frames += np.bincount(lg_batch, minlength=len(s.new_frames))
        shared = np.repeat(light & (size >= 2), size)
        on = mach[shared] if idx is None else mach[idx[shared]]
        s.shared_pages += np.bincount(on, minlength=len(s.shared_pages))
        for g in np.flatnonzero(~light).tolist():
            span = np.arange(start[g], start[g] + size[g])
            pages = span if idx is None else idx[span]
            self._heavy(s, int(g_host[g]), batch[pages], mach[pages])

    def _heavy(self, s: Scenario, host: int, batches: np.ndarray, machs: np.ndarray) -> None:
        """Replay one content with more copies than a frame takes, batch by batch."""
        run_start = np.flatnonzero(np.r_[True, batches[1:] != batches[:-1]])
        run_size = np.diff(np.r_[run_start, len(batches)])
        users: list[int] = []
        indexed: list[int] = []  # frames still in the index, oldest first
        members: list[dict[int, int]] = []
        for b, c, m in zip(
            batches[run_start].tolist(), run_size.tolist(), machs[run_start].tolist(), strict=True
        ):
            main = min(c, MAX_REFCOUNT)
            chosen = -1
            keep: list[int] = []
            for pos, f in enumerate(indexed):
                if users[f] + main <= MAX_REFCOUNT:
                    chosen = f
                    keep.extend(indexed[pos:])
                    break
                if users[f] >= MAX_REFCOUNT:
                    s.removals.append((host, b))  # saturated: _find drops it from the index
                else:
                    keep.append(f)
            indexed = keep
            if chosen < 0:
                chosen = len(users)
                users.append(0)
                members.append({})
                indexed.append(chosen)
                s.indexed[host] += 1
                s.last_insert[host] = max(s.last_insert[host], b)
                s.new_frames[b] += 1
            users[chosen] += main
            members[chosen][m] = members[chosen].get(m, 0) + main
            rest = c - main
            while rest > 0:  # copies past a frame's room in one batch: frames of their own
                take = min(rest, MAX_REFCOUNT)
                users.append(take)
                members.append({m: take})
                s.new_frames[b] += 1
                rest -= take
        for f, u in enumerate(users):
            s.frames[host] += 1
            if u >= 2:
                s.frames_shared[host] += 1
                for m, k in members[f].items():
                    s.shared_pages[m] += k


# -- figures --------------------------------------------------------------------


def pool_metadata(
    allocs: Iterable[int], pool_bytes: int, machines: int, free_len: int | None = None
) -> int:
    """Bytes of a fresh pool's and frame table's bookkeeping after ``allocs``.

    ``allocs`` are the frames of each allocation, in order; ``machines``
    the machines started (each takes a slot of the frame table). Follows
    FramePool (capacity grown in steps of 1/8, at least 8 chunks, capped at
    the reserved frames; the free stack; two per-chunk arrays) and
    FrameTable (a count and an owner per frame, two flag bits, two int64
    counters per slot).
    """
    max_frames = max(1, pool_bytes // PAGE_SIZE)
    reserved = -(-(max_frames + 1) // CHUNK_FRAMES) * CHUNK_FRAMES
    length, hwm = CHUNK_FRAMES, 1
    for k in allocs:
        if k <= 0:
            continue
        hwm += k
        if hwm > length:
            step = max(length // 8, 8 * CHUNK_FRAMES)
            length = min(-(-hwm // step) * step, reserved)
    chunks = -(-length // CHUNK_FRAMES)
    free = CHUNK_FRAMES if free_len is None else free_len
    pool = 4 * free + 3 * chunks
    slots = 8
    while slots <= machines:  # slot numbers start at 1; the arrays double when full
        slots *= 2
    owner = 1 if machines <= 0xFF else 2
    table = length * (1 + owner) + 2 * -(-length // 8) + 2 * 8 * slots
    return pool + table


def map_metadata(machines: Sequence[MachineScan], allocs: Iterable[int]) -> int:
    """Bytes of the machines' page maps and, for live sources, stable-scan counters.

    A page-map entry takes three bytes while frame ids fit in 24 bits
    (PageMap); the frames handed out (``allocs``) bound the largest id.
    """
    from pagefusion.server.engine.pagemap import entry_bytes

    width = entry_bytes(1 + sum(k for k in allocs if k > 0))
    return sum(width * m.guest_pages + (m.guest_pages if m.live else 0) for m in machines)


def _host_allocs(scan: Sequence[MachineScan], s: Scenario, host: int) -> list[int]:
    allocs: list[int] = []
    offset = 0
    for i, m in enumerate(scan):
        if s.host_of[i] == host:
            if s.pool_of[i] >= 0:
                allocs.extend(s.new_frames[offset : offset + m.batches].tolist())
            else:
                allocs.extend(m.batch_nonzero.tolist())
        offset += m.batches
    return allocs


def host_figures(
    scan: Sequence[MachineScan],
    guest: int,
    zero: int,
    frames: int,
    frames_shared: int,
    metadata: int,
) -> dict[str, int]:
    """HostFusionStats as a server would show it (plus profit)."""
    saved = guest - zero - frames
    return {
        "guest_pages": guest,
        "zero_pages": zero,
        "private_pages": frames - frames_shared,
        "shared_pages": saved + frames_shared,
        "frames_used": frames,
        "frames_shared": frames_shared,
        "pages_saved": saved,
        "metadata_bytes": metadata,
        "profit_bytes": (saved + zero) * PAGE_SIZE - metadata,
    }


def scenario_hosts(
    scan: Sequence[MachineScan], s: Scenario, pool_bytes: int
) -> list[dict[str, Any]]:
    """Per host of a replayed scenario: its machines and host figures."""
    out = []
    for h in range(s.hosts):
        members = [i for i in range(len(scan)) if s.host_of[i] == h]
        guest = sum(scan[i].guest_pages for i in members)
        zero = sum(scan[i].zero_pages for i in members)
        private_machines = sum(scan[i].nonzero_pages for i in members if s.pool_of[i] < 0)
        frames = int(s.frames[h]) + private_machines
        flushed = pending = 0
        for host, b in s.removals:
            if host == h:
                if b <= s.last_insert[h]:
                    flushed += 1
                else:
                    pending += 1
        index = 8 * (int(s.indexed[h]) - flushed + pending)
        allocs = _host_allocs(scan, s, h)
        maps = map_metadata([scan[i] for i in members], allocs)
        metadata = pool_metadata(allocs, pool_bytes, len(members)) + index + maps
        figures = host_figures(scan, guest, zero, frames, int(s.frames_shared[h]), metadata)
        out.append({"machines": [scan[i].spec.name for i in members], **figures})
    return out


def scenario_machines(scan: Sequence[MachineScan], s: Scenario) -> list[dict[str, Any]]:
    """MachineFusionStats per machine, sorted by name as GetFusionStats sorts them."""
    rows = []
    for i, m in enumerate(scan):
        shared = int(s.shared_pages[i])
        rows.append({
            "name": m.spec.name,
            "guest_pages": m.guest_pages,
            "zero_pages": m.zero_pages,
            "private_pages": m.nonzero_pages - shared,
            "shared_pages": shared,
        })
    return sorted(rows, key=lambda r: r["name"])


# -- the hint path --------------------------------------------------------------


def replay_hints(scan: Sequence[MachineScan], pool_bytes: int) -> dict[str, Any]:
    """FUSION_MODE_HINTS on one fresh server, a guest agent cycle per machine in order.

    Mirrors FusionEngine.check_shared_modules and ModuleRegistry: per
    (domain, module identity) and page position, the first machine to offer
    a non-zero page provides the canonical frame; a later PRIVATE page at
    that position with equal content moves onto it (as room allows). Frames
    are the engine's own ids (a fresh server hands them out in order), so
    the free stack the moves leave can be counted too.
    """
    # Table of every module page of every machine: row = (machine, position).
    bases = np.cumsum([0] + [len(m.module_pages) for m in scan])
    rows = int(bases[-1])
    hashes = np.concatenate([m.module_hashes for m in scan]) if rows else np.zeros((0, 2),
                                                                                    np.uint64)
    frame_base = np.cumsum([0] + [m.nonzero_pages for m in scan])
    engine_id = np.zeros(rows, dtype=np.int64)
    for i, m in enumerate(scan):
        rank = m.module_rank
        engine_id[bases[i] : bases[i + 1]] = np.where(rank >= 0, 1 + frame_base[i] + rank, 0)
    # frames are table rows + 1 (0: the zero page); a frame's content is its row's page.
    frame_of = np.where(engine_id > 0, np.arange(1, rows + 1), 0)
    refs = (engine_id > 0).astype(np.int64)
    refs = np.r_[0, refs]
    hinted = np.zeros(rows + 1, dtype=bool)
    alive = np.r_[False, engine_id > 0]
    total_frames = int(frame_base[-1])
    chunk_alloc = np.bincount(
        np.arange(1, total_frames + 1) // CHUNK_FRAMES,
        minlength=total_frames // CHUNK_FRAMES + 1,
    ) if total_frames else np.zeros(1, dtype=np.int64)
    chunk_used = chunk_alloc.copy()
    nfree, free_len = 0, CHUNK_FRAMES
    canonical: dict[tuple[str, tuple[Any, ...]], list[np.ndarray]] = {}
    freed_total = 0
    module_bytes = 0
    frame_hi = np.r_[np.uint64(0), hashes[:, 0]] if rows else np.zeros(1, np.uint64)
    frame_lo = np.r_[np.uint64(0), hashes[:, 1]] if rows else np.zeros(1, np.uint64)
    for i, m in enumerate(scan):
        if not m.spec.page_fusion or not m.registrations:
            continue
        domain = m.spec.domain
        for reg in m.registrations:
            ck = (domain, reg.key)
            if ck not in canonical:
                canonical[ck] = [np.zeros(size // PAGE_SIZE, dtype=np.int64)
                                 for _, size in reg.key[4]]
        module_bytes += m.registration_bytes
        for reg in m.registrations:
            for canon, pages in zip(canonical[(domain, reg.key)], reg.regions, strict=True):
                row = bases[i] + np.searchsorted(m.module_pages, pages)
                frames = frame_of[row]
                nonzero = frames != 0
                valid = (canon != 0) & hinted[canon]
                offer = nonzero & ~valid
                if offer.any():
                    canon[offer] = frames[offer]
                    hinted[frames[offer]] = True
                cand = np.flatnonzero(valid & nonzero & (frames != canon) & (refs[frames] == 1))
                if not len(cand):
                    continue
                old, target = frames[cand], canon[cand]
                equal = (frame_hi[old] == frame_hi[target]) & (frame_lo[old] == frame_lo[target])
                cand, target = cand[equal], target[equal]
                order = np.argsort(target, kind="stable")
                st = target[order]
                rank = np.arange(len(st)) - np.searchsorted(st, st)
                cand = np.sort(cand[order[rank < MAX_REFCOUNT - refs[st]]])
                if not len(cand):
                    continue
                old, target = frames[cand], canon[cand]
                uniq, counts = np.unique(target, return_counts=True)
                refs[uniq] += counts
                frame_of[row[cand]] = target
                # old frames were private: freed, no longer canonical anywhere in the domain
                refs[old] = 0
                alive[old] = False
                gone = old[hinted[old]]
                if len(gone):
                    hinted[gone] = False
                    for (d, _), arrays in canonical.items():
                        if d == domain:
                            for arr in arrays:
                                arr[np.isin(arr, gone)] = 0
                freed_total += len(old)
                end = nfree + len(old)
                if end > free_len:
                    free_len = max(end, 2 * free_len)
                nfree = end
                ids = engine_id[old - 1]
                per_chunk = np.bincount(ids // CHUNK_FRAMES, minlength=len(chunk_used))
                before = chunk_used > 0
                chunk_used -= per_chunk
                drained = np.flatnonzero(before & (chunk_used == 0) & (per_chunk > 0))
                nfree -= int(chunk_alloc[drained].sum())
    module_bytes += sum(4 * sum(len(a) for a in arrays) for arrays in canonical.values())
    guest = sum(m.guest_pages for m in scan)
    zero = sum(m.zero_pages for m in scan)
    frames_used = total_frames - freed_total
    frames_shared = int(np.count_nonzero(refs >= 2))
    allocs = [int(k) for m in scan for k in m.batch_nonzero.tolist()]
    maps = map_metadata(scan, allocs)
    metadata = pool_metadata(allocs, pool_bytes, len(scan), free_len) + maps + module_bytes
    machines = []
    for i, m in enumerate(scan):
        rows_i = frame_of[bases[i] : bases[i + 1]]
        shared = int(np.count_nonzero((rows_i != 0) & (refs[rows_i] >= 2)))
        machines.append({
            "name": m.spec.name,
            "guest_pages": m.guest_pages,
            "zero_pages": m.zero_pages,
            "private_pages": m.nonzero_pages - shared,
            "shared_pages": shared,
        })
    host = host_figures(scan, guest, zero, frames_used, frames_shared, metadata)
    return {"host": host, "machines": sorted(machines, key=lambda r: r["name"])}


# -- placement ------------------------------------------------------------------


def greedy_placement(
    scan: Sequence[MachineScan],
    content_ids: Sequence[np.ndarray],
    hosts: int,
    host_frames: int,
) -> list[int]:
    """Machines onto hosts, largest first, each where it adds the fewest frames and fits.

    Raises:
        EstimateError: a machine fits on no host.
    """
    sets: list[dict[str, np.ndarray]] = [{} for _ in range(hosts)]
    used = [0] * hosts
    host_of = [0] * len(scan)
    order = sorted(range(len(scan)), key=lambda i: (-scan[i].nonzero_pages, i))
    for i in order:
        spec = scan[i].spec
        best: tuple[int, int, int] | None = None
        for h in range(hosts):
            if spec.page_fusion:
                present = sets[h].get(spec.domain)
                ids = content_ids[i]
                common = 0 if present is None else int(np.count_nonzero(
                    np.isin(ids, present, assume_unique=True)))
                extra = len(ids) - common
            else:
                extra = scan[i].nonzero_pages
            if used[h] + extra > host_frames:
                continue
            choice = (extra, used[h], h)
            if best is None or choice < best:
                best = choice
        if best is None:
            raise EstimateError(
                f"machine {spec.machine_id!r} fits on no host: each host holds "
                f"{host_frames} frames and the fullest free room is "
                f"{host_frames - min(used)} frames"
            )
        extra, _, h = best
        used[h] += extra
        host_of[i] = h
        if spec.page_fusion:
            present = sets[h].get(spec.domain)
            ids = content_ids[i]
            sets[h][spec.domain] = ids if present is None else np.union1d(present, ids)
    return host_of


# -- the whole estimate ---------------------------------------------------------


@dataclass
class Options:
    """What to compute besides the configured figures."""

    hosts: int | None = None
    host_memory: int | None = None
    pool_bytes: int | None = None  # the server's pool limit (default: this host's memory)


def evaluate(
    partials: Sequence[Partial], options: Options, *, release: bool = True
) -> dict[str, Any]:
    """All figures from the sorted hashes of every machine (partials in start order)."""
    from pagefusion.server.engine.pool import host_memory_bytes

    scan = [m for p in partials for m in p.machines]
    specs = [m.spec for m in scan]
    count = len(scan)
    pool_bytes = options.pool_bytes or host_memory_bytes()
    one = [0] * count
    configured = make_scenario("configured", specs, one, 1)
    one_domain = make_scenario("one_domain", specs, one, 1, fusion=True, one_domain=True)
    zero_only = make_scenario("zero_pages_only", specs, one, 1, fusion=False)
    scenarios = [configured, one_domain, zero_only]
    placing = options.hosts is not None
    round_robin = None
    if placing:
        assert options.hosts is not None and options.host_memory is not None
        round_robin = make_scenario(
            "round_robin", specs, [i % options.hosts for i in range(count)], options.hosts
        )
        scenarios.append(round_robin)
    replay = Replay(scan, scenarios, content_ids=placing)
    keep = not release or placing
    feeds = _feeds(partials)
    for first, last in feeds:
        replay.feed(*_bucket_of(partials, first, last, release=not keep))
    result: dict[str, Any] = {}
    host = scenario_hosts(scan, configured, pool_bytes)[0]
    host.pop("machines")
    result["host"] = host
    result["machines"] = scenario_machines(scan, configured)
    pairs = replay.pairs if replay.pairs is not None else np.zeros((count, count), np.int64)
    for i, m in enumerate(scan):
        pairs[i, i] = m.nonzero_pages - int(replay.distinct[i])
    result["sharing"] = {
        "machines": [m.spec.name for m in scan],
        "pages": pairs.tolist(),
        "distinct_pages": replay.distinct.tolist(),
    }
    policies: dict[str, Any] = {}
    for s in (configured, one_domain, zero_only):
        figures = scenario_hosts(scan, s, pool_bytes)[0]
        figures.pop("machines")
        policies[s.name] = figures
    policies["hints_only"] = replay_hints(scan, pool_bytes)["host"]
    result["policies"] = policies
    if placing:
        assert options.hosts is not None and options.host_memory is not None
        assert round_robin is not None and replay.content_ids is not None
        host_pool = options.host_memory
        ids = [np.concatenate(parts) if parts else np.zeros(0, np.int64)
               for parts in replay.content_ids]
        replay.content_ids = None
        host_frames = options.host_memory // PAGE_SIZE
        host_of = greedy_placement(scan, ids, options.hosts, host_frames)
        del ids
        placed = make_scenario("placement", specs, host_of, options.hosts)
        second = Replay(scan, [placed], pairs=False)
        for first, last in feeds:
            second.feed(*_bucket_of(partials, first, last, release=release))
        placed_hosts = scenario_hosts(scan, placed, host_pool)
        rr_hosts = scenario_hosts(scan, round_robin, host_pool)
        placed_total = sum(h["frames_used"] for h in placed_hosts)
        rr_total = sum(h["frames_used"] for h in rr_hosts)
        if rr_total < placed_total and all(h["frames_used"] <= host_frames for h in rr_hosts):
            placed_hosts, placed_total = rr_hosts, rr_total  # never worse than round robin
        result["placement"] = {
            "host_memory_bytes": options.host_memory,
            "frames_used": placed_total,
            "pages_saved": sum(h["pages_saved"] for h in placed_hosts),
            "fits": all(h["frames_used"] <= host_frames for h in placed_hosts),
            "hosts": [
                {"machines": h["machines"], "frames_used": h["frames_used"],
                 "pages_saved": h["pages_saved"], "zero_pages": h["zero_pages"],
                 "frames_shared": h["frames_shared"], "guest_pages": h["guest_pages"]}
                for h in placed_hosts
            ],
            "round_robin": {
                "frames_used": rr_total,
                "pages_saved": sum(h["pages_saved"] for h in rr_hosts),
                "fits": all(h["frames_used"] <= host_frames for h in rr_hosts),
                "hosts": [{"machines": h["machines"], "frames_used": h["frames_used"],
                           "pages_saved": h["pages_saved"]} for h in rr_hosts],
            },
        }
    result["estimate"] = {
        "bytes_read": sum(m.guest_pages for m in scan) * PAGE_SIZE,
        "hash": "mmh3 x64 128-bit, keyed",
        "collision_bound": collision_bound(sum(int(d) for d in replay.distinct)),
    }
    return result


def collision_bound(distinct: int) -> float:
    """Upper bound on the chance that two different pages share a 128-bit hash."""
    return float(min(1.0, distinct * distinct / 2.0**129))


# -- progress ---------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; silent when ``stream`` is not one."""

    def __init__(self, total_pages: int, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = max(total_pages, 1)
        self.done = 0
        self.started = time.monotonic()
        self._shown = -1.0

    def advance(self, pages: int) -> None:
        self.done += pages
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._shown < 0.1 and self.done < self.total:
            return
        self._shown = now
        share = min(self.done / self.total, 1.0)
        width = 30
        bar = "#" * int(share * width)
        rate = self.done * PAGE_SIZE / max(now - self.started, 1e-9) / (1 << 20)
        self.stream.write(
            f"\rreading [{bar:<{width}}] {share * 100:5.1f}% "
            f"{self.done * PAGE_SIZE >> 20}/{self.total * PAGE_SIZE >> 20} MiB {rate:.0f} MiB/s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._shown >= 0:
            self.stream.write("\n")
            self.stream.flush()


def estimate(
    specs: Sequence[MachineSpec],
    options: Options | None = None,
    *,
    seed: int | None = None,
    progress_stream: IO[str] | None = None,
) -> dict[str, Any]:
    """Read every machine's source here and return the estimate (see module docstring)."""
    from pagefusion.adapters.registry import load_adapters

    options = options or Options()
    seed = secrets.randbits(32) if seed is None else seed
    adapters = load_adapters()
    opened: list[GuestMemory] = []
    try:
        for spec in specs:
            opened.append(open_spec(spec, adapters))
        total = sum(r.pages for memory in opened for r in memory.ranges())
    except BaseException:
        for memory in opened:
            memory.close()
        raise
    bar = Progress(total, progress_stream)
    partials: list[Partial] = []
    opened.reverse()  # popped in start order; scan_source closes each
    try:
        for spec in specs:
            partials.append(scan_source(spec, seed, memory=opened.pop(), progress=bar.advance,
                                        ordered=False))
    finally:
        bar.close()
        for left in opened:
            left.close()
    return evaluate(partials, options)


# -- text -------------------------------------------------------------------------


def _mib(pages: int) -> str:
    return f"{pages * PAGE_SIZE / (1 << 20):,.1f} MiB"


def format_estimate(result: Mapping[str, Any]) -> str:
    """The estimate for people: host, machines, policies, sharing, placement."""
    host = result["host"]
    lines = ["Estimate (what GetFusionStats would show once these machines run)", ""]
    lines.append("Host:")
    for key in ("guest_pages", "zero_pages", "frames_used", "pages_saved", "frames_shared"):
        lines.append(f"  {key + ':':<16}{host[key]:>14,}  ({_mib(host[key])})")
    lines.append(f"  {'profit:':<16}{host['profit_bytes'] / (1 << 20):>14,.1f} MiB "
                 f"(savings minus {host['metadata_bytes'] / (1 << 20):,.1f} MiB of metadata)")
    lines.append("")
    lines.append(f"{'Machine':<34} {'Guest':>10} {'Zero':>10} {'Shared':>10} {'Private':>10}")
    for m in result["machines"]:
        lines.append(f"{m['name']:<34} {m['guest_pages']:>10} {m['zero_pages']:>10} "
                     f"{m['shared_pages']:>10} {m['private_pages']:>10}")
    lines.append("")
    lines.append("Policies (pages saved, frames used, profit):")
    labels = {
        "configured": "as configured",
        "one_domain": "all machines in one domain",
        "zero_pages_only": "zero pages only",
        "hints_only": "hint path alone",
    }
    for name, figures in result["policies"].items():
        lines.append(f"  {labels.get(name, name):<28} saved {figures['pages_saved']:>10,}  "
                     f"frames {figures['frames_used']:>10,}  "
                     f"profit {figures['profit_bytes'] / (1 << 20):>10,.1f} MiB")
    sharing = result["sharing"]
    names = sharing["machines"]
    if len(names) > 1:
        lines.append("")
        lines.append("Pages two machines have in common (distinct contents; diagonal: "
                     "duplicates inside one):")
        short = [n.removeprefix("machines/")[:10] for n in names]
        lines.append(" " * 12 + " ".join(f"{s:>10}" for s in short))
        for s, row in zip(short, sharing["pages"], strict=True):
            lines.append(f"{s:>11} " + " ".join(f"{v:>10}" for v in row))
    placement = result.get("placement")
    if placement:
        lines.append("")
        lines.append(f"Placement on {len(placement['hosts'])} hosts of "
                     f"{placement['host_memory_bytes'] / (1 << 30):,.2f} GiB: "
                     f"{placement['frames_used']:,} frames "
                     f"(round robin: {placement['round_robin']['frames_used']:,})"
                     + ("" if placement["fits"] else "  DOES NOT FIT"))
        for i, h in enumerate(placement["hosts"]):
            members = ", ".join(n.removeprefix("machines/") for n in h["machines"]) or "-"
            lines.append(f"  host {i}: frames {h['frames_used']:,}, saved "
                         f"{h['pages_saved']:,}: {members}")
    return "\n".join(lines) + "\n"


def plot_sharing(result: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw the pairwise sharing matrix as a heatmap PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EstimateError("--plot needs matplotlib (pip install matplotlib)") from None
    names = [n.removeprefix("machines/") for n in result["sharing"]["machines"]]
    matrix = np.array(result["sharing"]["pages"], dtype=np.float64) * PAGE_SIZE / (1 << 20)
    size = max(4.0, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    fig.colorbar(image, ax=ax, label="MiB in common (diagonal: duplicates inside)")
    ax.set_title("pagefusion estimate: sharing between machines")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)



# -- the command ------------------------------------------------------------------


def run_cli(
    args: Any, as_json: bool, error: Callable[[str], None], stdout: IO[str] | None = None
) -> int:
    """``pagefusion estimate``: parsed arguments in, exit status out (0, 1 or 130).

    Every failure is one line through ``error``; nothing here needs a server.
    """
    stdout = stdout if stdout is not None else sys.stdout
    try:
        if (args.hosts is None) != (args.host_memory is None):
            error("--hosts and --host-memory go together")
            return 2
        if args.hosts is not None and (args.hosts < 1 or args.host_memory < PAGE_SIZE):
            error("--hosts must be at least 1 and --host-memory at least one page (4096)")
            return 2
        specs = load_specs(args.specs)
        options = Options(hosts=args.hosts, host_memory=args.host_memory)
        if args.scheduler:
            from pagefusion.clients.fleet import estimate_on_cluster

            result = estimate_on_cluster(specs, args.scheduler, options)
        else:
            result = estimate(specs, options)
        if args.plot:
            plot_sharing(result, args.plot)
        if as_json:
            stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            stdout.write(format_estimate(result))
        stdout.flush()
        return 0
    except EstimateError as exc:
        error(str(exc))
        return 1
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except MemoryError:
        error("out of memory while estimating; try --scheduler to spread the work")
        return 1
