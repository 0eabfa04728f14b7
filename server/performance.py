"""PerformanceService: VirtualBox's performance collector over the engine's figures.

Read ``reference/page-fusion.md`` ("Metrics") for the behaviour copied here.

The metrics themselves (names, descriptions, how each is computed) come from
``metrics_catalog``, which the Prometheus exporter reads too. Every base
metric of every object (``host``, or the id of a running machine)
is a *series*: a ring buffer of ``sample_count`` values, collected every
``period_seconds`` while enabled. One sampler, off the request path, reads
``FusionEngine.stats()`` once per tick and records every series that is due
from that one call, so the figures inside a sample come from one instant:

    sum of Guest/RAM/Usage/Total over machines
        = RAM/VMM/Used + RAM/VMM/Shared + RAM/VMM/Zero

and ``RAM/VMM/Profit`` (KSM's general_profit) is ``RAM/VMM/Shared +
RAM/VMM/Zero`` minus the engine's metadata, never below 0.

Names follow VBoxManage: every base metric is also listed and queried as
``NAME:avg``, ``NAME:min`` and ``NAME:max``, computed over the buffer when
asked (one value; the average by integer division; no value while the
buffer is empty). Patterns match case-insensitively with ``*`` (any run of
characters, ``:`` included) and ``?`` (one character); a pattern ending in
``:`` matches base metrics only (``*:`` is every base metric). Setup, enable
and disable act on base metrics: a suffix in their patterns is ignored.

``SetupMetrics`` discards samples and resumes collection; ``EnableMetrics``
and ``DisableMetrics`` keep them; a period or count of 0 stops collection.
Defaults: period 1 s, 1 sample. A machine's series appear when it starts
and are dropped, samples and all, when it stops. Settings are remembered as
rules, so a machine that starts after ``SetupMetrics`` (for example one
matched by ``*``) is collected the way that call asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
from grpc import aio

from pagefusion.server.engine import FusionEngine
from pagefusion.server.engine.types import PAGE_SIZE, FusionStats, HostStats, MachineStats
from pagefusion.server.errors import invalid_argument, not_found
from pagefusion.server.metrics_catalog import (
    PERFORMANCE_METRICS,
    PERFORMANCE_UNIT,
    CatalogEntry,
    ObjectKind,
)
from pagefusion.server.resources import MACHINE_ID_RE, MACHINE_TYPE, machine_name
from pagefusion.v1 import performance_pb2 as pb
from pagefusion.v1 import performance_pb2_grpc

log = structlog.get_logger(__name__)

HOST = "host"
UNIT = PERFORMANCE_UNIT
KB_PER_PAGE = PAGE_SIZE // 1024
DEFAULT_PERIOD = 1
DEFAULT_COUNT = 1
#: Bounds that keep buffers' memory small (VirtualBox has none; a day and 10k
#: samples are far beyond what its tools ask for).
MAX_PERIOD = 86400
MAX_COUNT = 10000
AGGREGATES = ("avg", "min", "max")
_AGGREGATE_TEXT = {
    "avg": "average of the buffered samples",
    "min": "minimum of the buffered samples",
    "max": "maximum of the buffered samples",
}
#: Remembered setup/enable/disable rules (oldest dropped beyond this).
MAX_RULES = 256
_MAX_PATTERN = 256
#: Longest the sampler sleeps, so machines that start are picked up promptly.
MAX_SAMPLER_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class MetricDef:
    """A base metric: its name, which objects have it, and how to read it (in kB)."""

    name: str
    kind: ObjectKind
    description: str
    entry: CatalogEntry

    def value(self, stats: HostStats | MachineStats) -> int:
        """The sample recorded from one stats reading."""
        return self.entry.performance_value(stats)


#: Every base metric, in the order they are listed (DESIGN.md, "Metrics"): the
#: catalog's entries that have a VirtualBox name (shared with Prometheus).
METRICS: tuple[MetricDef, ...] = tuple(
    MetricDef(e.metric, e.kind, e.description, e) for e in PERFORMANCE_METRICS.values()
)
_BY_NAME = {m.name: m for m in METRICS}


# -- patterns -----------------------------------------------------------------


def _glob(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True, slots=True)
class _NamePattern:
    regex: re.Pattern[str]
    base_only: bool

    def matches(self, name: str) -> bool:
        if self.base_only and ":" in name:
            return False
        return self.regex.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class MetricFilter:
    """Which metric names and objects a request asks for (empty: all)."""

    names: tuple[_NamePattern, ...] = ()
    objects: tuple[re.Pattern[str], ...] = ()

    def metric(self, name: str) -> bool:
        return not self.names or any(p.matches(name) for p in self.names)

    def object(self, obj: str) -> bool:
        return not self.objects or any(p.fullmatch(obj) for p in self.objects)

    def series(self, obj: str, base: str) -> bool:
        """Whether any name of the series (base or aggregate) is asked for."""
        return self.object(obj) and any(self.metric(n) for n in _names_of(base))


def _names_of(base: str) -> tuple[str, ...]:
    return (base, *(f"{base}:{a}" for a in AGGREGATES))


def _name_pattern(text: str, field: str, *, base: bool) -> _NamePattern:
    pattern = text.strip()
    if not pattern:
        raise invalid_argument(field, "a metric name must not be empty")
    if len(pattern) > _MAX_PATTERN:
        raise invalid_argument(field, f"a metric name is at most {_MAX_PATTERN} characters")
    stem, colon, suffix = pattern.partition(":")
    if ":" in suffix:
        raise invalid_argument(field, f"{pattern!r} has more than one ':'")
    if suffix and not set("*?") & set(suffix) and suffix.lower() not in AGGREGATES:
        raise invalid_argument(
            field, f"unknown aggregate ':{suffix}' in {pattern!r}; use :avg, :min or :max"
        )
    if base:  # setup, enable and disable act on base metrics (VBoxManage's toBaseMetricNames)
        return _NamePattern(_glob(stem), base_only=True)
    if colon and not suffix:  # 'NAME:' and '*:' name base metrics only
        return _NamePattern(_glob(stem), base_only=True)
    return _NamePattern(_glob(pattern), base_only=False)


def _object_id(text: str, field: str, known: Callable[[str], bool] | None) -> re.Pattern[str]:
    obj = text.strip()
    obj = obj.removeprefix("machines/")
    if not obj:
        raise invalid_argument(field, "an object must be 'host', a machine id or a pattern")
    if len(obj) > _MAX_PATTERN:
        raise invalid_argument(field, f"an object is at most {_MAX_PATTERN} characters")
    if set("*?") & set(obj):
        return _glob(obj)
    if obj != HOST:
        if not MACHINE_ID_RE.fullmatch(obj):
            raise invalid_argument(
                field, f"invalid object {text!r}: expected 'host', a machine id or a pattern"
            )
        if known is not None and not known(obj):
            raise not_found(MACHINE_TYPE, machine_name(obj))
    return re.compile(re.escape(obj))


# -- series and rules ---------------------------------------------------------


class _Series:
    """One base metric of one object: settings and its ring buffer."""

    __slots__ = ("count", "due", "enabled", "period", "values")

    def __init__(self, now: float) -> None:
        self.period = DEFAULT_PERIOD
        self.count = DEFAULT_COUNT
        self.enabled = True
        self.values: deque[int] = deque(maxlen=DEFAULT_COUNT)
        self.due = now

    @property
    def collecting(self) -> bool:
        return self.enabled and self.period > 0 and self.count > 0

    def setup(self, period: int, count: int, now: float) -> None:
        self.period = period
        self.count = count
        self.enabled = True
        self.values = deque(maxlen=count)
        self.due = now

    def enable(self, on: bool, now: float) -> None:
        if on and not self.enabled:
            self.due = now
        self.enabled = on


@dataclass(frozen=True, slots=True)
class _Rule:
    """A setup, enable or disable call, replayed on machines that start later."""

    filter: MetricFilter
    action: Literal["setup", "enable", "disable"]
    period: int = 0
    count: int = 0

    def apply(self, series: _Series, now: float) -> None:
        if self.action == "setup":
            series.setup(self.period, self.count, now)
        else:
            series.enable(self.action == "enable", now)


@dataclass(frozen=True, slots=True)
class MetricInfo:
    """What ListMetrics and the setup calls report about one metric of one object."""

    object: str
    metric: str
    unit: str
    minimum: int
    maximum: int
    period_seconds: int
    sample_count: int
    description: str


@dataclass(frozen=True, slots=True)
class MetricValues:
    """What QueryMetrics reports for one metric of one object (oldest first)."""

    object: str
    metric: str
    unit: str
    scale: int
    values: tuple[int, ...]


def _aggregate(kind: str, values: Sequence[int]) -> tuple[int, ...]:
    if not values:
        return ()
    if kind == "avg":
        return (sum(values) // len(values),)
    return (min(values),) if kind == "min" else (max(values),)


def check_setup(period: int, count: int) -> None:
    """INVALID_ARGUMENT unless period and count are within bounds."""
    if not 0 <= period <= MAX_PERIOD:
        raise invalid_argument("period_seconds", f"must be between 0 and {MAX_PERIOD}")
    if not 0 <= count <= MAX_COUNT:
        raise invalid_argument("sample_count", f"must be between 0 and {MAX_COUNT}")


# -- the collector ------------------------------------------------------------


class MetricsCollector:
    """The series of every object, their settings, and sampling.

    Thread-safe; free of asyncio and gRPC. :class:`Sampler` drives it on a
    timer; tests drive it with :meth:`sample_now` or :meth:`tick` and a fake
    ``clock``.

    Args:
        stats: reads the engine's figures from one instant (``FusionEngine.stats``).
        running: ids of running machines (``FusionEngine.running_machines``),
            checked on every request so a stopped machine's data goes at once;
            without it, machines come and go with samples only.
        known: whether a machine id exists at all (stopped or running); plain
            ids that do not are NOT_FOUND. Without it any valid id is accepted.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        stats: Callable[[], FusionStats],
        *,
        running: Callable[[], Iterable[str]] | None = None,
        known: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stats = stats
        self._running = running
        self._known = known
        self._clock = clock
        self._lock = threading.RLock()
        now = clock()
        self._host = {m.name: _Series(now) for m in METRICS if m.kind == "host"}
        self._machines: dict[str, dict[str, _Series]] = {}
        # Membership epochs: a sample whose stats were read before a machine
        # was dropped (or added) must not bring it back (or drop it).
        self._epoch = 0
        self._added: dict[str, int] = {}
        self._gone: dict[str, int] = {}
        self._rules: deque[_Rule] = deque(maxlen=MAX_RULES)
        self._listeners: list[Callable[[frozenset[tuple[str, str]]], None]] = []
        self._change_listeners: list[Callable[[], None]] = []
        self.closed = False

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    @classmethod
    def for_engine(
        cls, engine: FusionEngine, known: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> MetricsCollector:
        return cls(engine.stats, running=engine.running_machines, known=known, clock=clock)

    # -- listeners ------------------------------------------------------------

    def add_listener(self, listener: Callable[[frozenset[tuple[str, str]]], None]) -> None:
        """Call ``listener(series sampled)`` after every sample, and with none on close."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[frozenset[tuple[str, str]]], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def add_change_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when settings or machines change (to wake the sampler)."""
        with self._lock:
            self._change_listeners.append(listener)

    def remove_change_listener(self, listener: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._change_listeners.remove(listener)

    def _notify(self, sampled: frozenset[tuple[str, str]]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(sampled)

    def _changed(self) -> None:
        with self._lock:
            listeners = list(self._change_listeners)
        for listener in listeners:
            listener()

    def close(self) -> None:
        """End every watch (they see :attr:`closed`); sampling stops mattering."""
        self.closed = True
        self._notify(frozenset())

    # -- membership -----------------------------------------------------------

    def _add_machine(self, machine_id: str, now: float) -> None:
        series = {m.name: _Series(now) for m in METRICS if m.kind == "machine"}
        for rule in self._rules:
            for name, s in series.items():
                if rule.filter.series(machine_id, name):
                    rule.apply(s, now)
        self._machines[machine_id] = series
        self._epoch += 1
        self._added[machine_id] = self._epoch
        self._gone.pop(machine_id, None)

    def _drop_machine(self, machine_id: str) -> None:
        del self._machines[machine_id]
        self._epoch += 1
        self._gone[machine_id] = self._epoch
        self._added.pop(machine_id, None)
        if len(self._gone) > 4 * MAX_RULES:
            self._gone.pop(next(iter(self._gone)))

    def sync(self) -> None:
        """Follow the running machines now: drop stopped ones, add started ones."""
        if self._running is None:
            return
        running = set(self._running())
        with self._lock:
            now = self._clock()
            changed = False
            for machine_id in [m for m in self._machines if m not in running]:
                self._drop_machine(machine_id)
                changed = True
            for machine_id in sorted(running - set(self._machines)):
                self._add_machine(machine_id, now)
                changed = True
        if changed:
            self._changed()

    # -- sampling -------------------------------------------------------------

    def _all_series(self) -> Iterable[tuple[str, str, _Series]]:
        for name, s in self._host.items():
            yield HOST, name, s
        for machine_id in sorted(self._machines):
            for name, s in self._machines[machine_id].items():
                yield machine_id, name, s

    def next_due(self) -> float | None:
        """When the next series is due (clock seconds); None if none is collecting."""
        with self._lock:
            dues = [s.due for _, _, s in self._all_series() if s.collecting]
        return min(dues) if dues else None

    def tick(self) -> int:
        """Record every series that is due; returns how many were recorded."""
        self.sync()
        with self._lock:
            now = self._clock()
            due = self.next_due()
            if due is None or due > now:
                return 0
            epoch = self._epoch
        return self._record(self._stats(), epoch, now, force=False)

    def sample_now(self) -> int:
        """Record every collecting series at once, due or not (tests, first samples)."""
        with self._lock:
            epoch = self._epoch
            now = self._clock()
        return self._record(self._stats(), epoch, now, force=True)

    def _record(self, stats: FusionStats, epoch: int, now: float, *, force: bool) -> int:
        sampled: set[tuple[str, str]] = set()
        with self._lock:
            present = {m.machine_id: m for m in stats.machines}
            for machine_id in list(self._machines):
                if machine_id not in present and self._added.get(machine_id, 0) <= epoch:
                    self._drop_machine(machine_id)
            for machine_id in sorted(present):
                if machine_id not in self._machines and self._gone.get(machine_id, 0) <= epoch:
                    self._add_machine(machine_id, now)
            for obj, name, s in self._all_series():
                if not s.collecting or not (force or s.due <= now):
                    continue
                source: HostStats | MachineStats | None = (
                    stats.host if obj == HOST else present.get(obj)
                )
                if source is None:  # added after these stats were read
                    continue
                s.values.append(_BY_NAME[name].value(source))
                s.due = s.due + s.period if s.due + s.period > now else now + s.period
                sampled.add((obj, name))
        if sampled:
            self._notify(frozenset(sampled))
        return len(sampled)

    # -- requests -------------------------------------------------------------

    def filter(
        self, metric_names: Sequence[str], objects: Sequence[str], *, base: bool = False
    ) -> MetricFilter:
        """Parse a request's patterns; INVALID_ARGUMENT or NOT_FOUND naming the field."""
        return MetricFilter(
            names=tuple(
                _name_pattern(n, f"metric_names[{i}]", base=base)
                for i, n in enumerate(metric_names)
            ),
            objects=tuple(
                _object_id(o, f"objects[{i}]", self._known) for i, o in enumerate(objects)
            ),
        )

    def _matching(self, f: MetricFilter) -> list[tuple[str, str, _Series]]:
        return [(o, n, s) for o, n, s in self._all_series() if f.object(o) and f.metric(n)]

    def list_metrics(self, metric_names: Sequence[str], objects: Sequence[str]) -> list[MetricInfo]:
        """ListMetrics: base metrics and their aggregates, with range and settings."""
        return self.list_filter(self.filter(metric_names, objects))

    def list_filter(self, f: MetricFilter) -> list[MetricInfo]:
        self.sync()
        stats = self._stats()
        machines = {m.machine_id: m for m in stats.machines}
        pool_kb = stats.host.pool_bytes_reserved // 1024
        all_kb = stats.host.guest_pages * KB_PER_PAGE
        out: list[MetricInfo] = []
        with self._lock:
            for obj, base, s in self._all_series():
                if not f.object(obj):
                    continue
                metric = _BY_NAME[base]
                if obj == HOST:
                    maximum = pool_kb if base in ("RAM/VMM/Used", "RAM/VMM/Free") else all_kb
                else:
                    m = machines.get(obj)
                    maximum = m.guest_pages * KB_PER_PAGE if m is not None else 0
                for name in _names_of(base):
                    if not f.metric(name):
                        continue
                    kind = name.partition(":")[2]
                    description = metric.description
                    if kind:
                        description = f"{description[:-1]}; {_AGGREGATE_TEXT[kind]}."
                    out.append(MetricInfo(obj, name, UNIT, 0, max(maximum, 0), s.period,
                                          s.count, description))
        return out

    def _info(self, obj: str, base: str, s: _Series) -> MetricInfo:
        return MetricInfo(obj, base, UNIT, 0, 0, s.period, s.count, _BY_NAME[base].description)

    def _apply(self, rule: _Rule) -> list[MetricInfo]:
        self.sync()
        with self._lock:
            now = self._clock()
            if not rule.filter.names and not rule.filter.objects and rule.action == "setup":
                self._rules.clear()  # a setup of everything supersedes every earlier rule
            self._rules.append(rule)
            affected = self._matching(rule.filter)
            for _, _, s in affected:
                rule.apply(s, now)
            out = [self._info(o, n, s) for o, n, s in affected]
        self._changed()
        return out

    def setup(
        self, metric_names: Sequence[str], objects: Sequence[str], period: int, count: int
    ) -> list[MetricInfo]:
        """SetupMetrics: new period and buffer size; discards samples; 0 stops collection."""
        check_setup(period, count)
        return self.setup_filter(self.filter(metric_names, objects, base=True), period, count)

    def setup_filter(self, f: MetricFilter, period: int, count: int) -> list[MetricInfo]:
        check_setup(period, count)
        return self._apply(_Rule(f, "setup", period, count))

    def enable(
        self, metric_names: Sequence[str], objects: Sequence[str], on: bool = True
    ) -> list[MetricInfo]:
        """EnableMetrics (``on``) or DisableMetrics: resume or pause; keeps samples."""
        return self.enable_filter(self.filter(metric_names, objects, base=True), on)

    def enable_filter(self, f: MetricFilter, on: bool) -> list[MetricInfo]:
        return self._apply(_Rule(f, "enable" if on else "disable"))

    def query(self, metric_names: Sequence[str], objects: Sequence[str]) -> list[MetricValues]:
        """QueryMetrics: buffered samples (oldest first), or one aggregate value."""
        return self.query_filter(self.filter(metric_names, objects))

    def query_filter(self, f: MetricFilter) -> list[MetricValues]:
        self.sync()
        out: list[MetricValues] = []
        with self._lock:
            for obj, base, s in self._all_series():
                if not f.object(obj):
                    continue
                values = tuple(s.values)
                for name in _names_of(base):
                    if f.metric(name):
                        kind = name.partition(":")[2]
                        data = _aggregate(kind, values) if kind else values
                        out.append(MetricValues(obj, name, UNIT, 1, data))
        return out


# -- the sampler --------------------------------------------------------------


class Sampler:
    """Runs :meth:`MetricsCollector.tick` whenever a series is due, in a worker thread."""

    def __init__(self, collector: MetricsCollector, max_wait: float = MAX_SAMPLER_WAIT) -> None:
        self._collector = collector
        self._max_wait = max_wait
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._collector.add_change_listener(self._poke)
        self._task = asyncio.create_task(self._run(), name="pagefusion-metrics-sampler")

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            self._wake.clear()
            try:
                await asyncio.to_thread(self._collector.tick)
            except Exception:  # a failed sample must not end sampling
                log.exception("metrics_sample_failed")
            due = self._collector.next_due()
            delay = self._max_wait
            if due is not None:
                delay = min(delay, max(0.0, due - self._collector.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop after the sample in progress, so no worker thread reads the engine after."""
        task, self._task = self._task, None
        if task is None:
            return
        self._collector.remove_change_listener(self._poke)
        self._stopping = True
        self._poke()
        try:
            await asyncio.wait_for(task, timeout)
        except TimeoutError:  # a sample stuck behind the engine's lock: give up on it
            log.warning("metrics_sampler_stop_timeout", timeout=timeout)


# -- the servicer -------------------------------------------------------------


def _metric_pb(m: MetricInfo) -> pb.Metric:
    return pb.Metric(
        object=m.object, metric=m.metric, unit=m.unit, minimum=m.minimum, maximum=m.maximum,
        period_seconds=m.period_seconds, sample_count=m.sample_count, description=m.description,
    )


def _query_pb(data: Iterable[MetricValues]) -> pb.QueryMetricsResponse:
    return pb.QueryMetricsResponse(
        data=[
            pb.MetricData(object=d.object, metric=d.metric, unit=d.unit, scale=d.scale,
                          values=d.values)
            for d in data
        ]
    )


class PerformanceServicer(performance_pb2_grpc.PerformanceServiceServicer):
    """PerformanceService over a :class:`MetricsCollector` (which a :class:`Sampler` feeds).

    Requests are parsed on the event loop (the inventory lives there); the
    collector's work runs in worker threads, because it takes the engine's lock.
    """

    def __init__(self, collector: MetricsCollector) -> None:
        self._collector = collector

    async def ListMetrics(
        self, request: pb.ListMetricsRequest, context: aio.ServicerContext
    ) -> pb.ListMetricsResponse:
        f = self._collector.filter(request.metric_names, request.objects)
        metrics = await asyncio.to_thread(self._collector.list_filter, f)
        return pb.ListMetricsResponse(metrics=[_metric_pb(m) for m in metrics])

    async def SetupMetrics(
        self, request: pb.SetupMetricsRequest, context: aio.ServicerContext
    ) -> pb.SetupMetricsResponse:
        check_setup(request.period_seconds, request.sample_count)
        f = self._collector.filter(request.metric_names, request.objects, base=True)
        metrics = await asyncio.to_thread(
            self._collector.setup_filter, f, request.period_seconds, request.sample_count
        )
        return pb.SetupMetricsResponse(metrics=[_metric_pb(m) for m in metrics])

    async def EnableMetrics(
        self, request: pb.EnableMetricsRequest, context: aio.ServicerContext
    ) -> pb.EnableMetricsResponse:
        f = self._collector.filter(request.metric_names, request.objects, base=True)
        metrics = await asyncio.to_thread(self._collector.enable_filter, f, True)
        return pb.EnableMetricsResponse(metrics=[_metric_pb(m) for m in metrics])

    async def DisableMetrics(
        self, request: pb.DisableMetricsRequest, context: aio.ServicerContext
    ) -> pb.DisableMetricsResponse:
        f = self._collector.filter(request.metric_names, request.objects, base=True)
        metrics = await asyncio.to_thread(self._collector.enable_filter, f, False)
        return pb.DisableMetricsResponse(metrics=[_metric_pb(m) for m in metrics])

    async def QueryMetrics(
        self, request: pb.QueryMetricsRequest, context: aio.ServicerContext
    ) -> pb.QueryMetricsResponse:
        f = self._collector.filter(request.metric_names, request.objects)
        data = await asyncio.to_thread(self._collector.query_filter, f)
        return _query_pb(data)

    async def WatchMetrics(
        self, request: pb.WatchMetricsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.QueryMetricsResponse]:
        """The current buffers at once, then again after every sample of a watched series.

        Ends when the client cancels (the task is cancelled) or the server
        shuts down (the collector is closed).
        """
        collector = self._collector
        f = collector.filter(request.metric_names, request.objects)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_sample(sampled: frozenset[tuple[str, str]]) -> None:
            if collector.closed or any(f.series(o, n) for o, n in sampled):
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(wake.set)

        collector.add_listener(on_sample)
        try:
            while not collector.closed:
                wake.clear()
                yield _query_pb(await asyncio.to_thread(collector.query_filter, f))
                await wake.wait()
        finally:
            collector.remove_listener(on_sample)
