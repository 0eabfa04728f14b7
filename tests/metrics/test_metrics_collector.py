"""MetricsCollector: VirtualBox's performance collector semantics, driven by hand."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagefusion.server.engine import FusionEngine
from pagefusion.server.errors import ApiError
from pagefusion.server.performance import (
    MAX_COUNT,
    MAX_PERIOD,
    METRICS,
    MetricsCollector,
    MetricValues,
    Sampler,
)

HOST_METRICS = [
    "RAM/VMM/Used", "RAM/VMM/Free", "RAM/VMM/Shared", "RAM/VMM/Zero", "RAM/VMM/Profit",
]
GUEST_METRICS = [
    "Guest/RAM/Usage/Total",
    "Guest/RAM/Usage/Shared",
    "Guest/RAM/Usage/Private",
    "Guest/RAM/Usage/Zero",
]


def values(rows: list[MetricValues]) -> dict[tuple[str, str], tuple[int, ...]]:
    return {(r.object, r.metric): r.values for r in rows}


def one(c: MetricsCollector, obj: str, metric: str) -> tuple[int, ...]:
    rows = c.query([metric], [obj])
    assert len(rows) == 1, rows
    return rows[0].values


def start(engine: FusionEngine, memory: Any, machine_id: str, **pages: int) -> None:
    engine.start_machine(machine_id, memory(**pages), page_fusion=True)


def test_metric_names_and_objects(collector: MetricsCollector, engine: FusionEngine,
                                  memory: Any) -> None:
    assert [m.name for m in METRICS] == HOST_METRICS + GUEST_METRICS
    start(engine, memory, "vm1", zero=1, unique=1)
    listed = collector.list_metrics([], [])
    names = [(m.object, m.metric) for m in listed]
    suffixes = ("", ":avg", ":min", ":max")
    expected_host = [("host", f"{n}{s}") for n in HOST_METRICS for s in suffixes]
    expected_vm = [("vm1", f"{n}{s}") for n in GUEST_METRICS for s in suffixes]
    assert names == expected_host + expected_vm
    for m in listed:
        assert (m.unit, m.minimum, m.period_seconds, m.sample_count) == ("kB", 0, 1, 1)
        assert m.description
    total = next(m for m in listed if m.object == "vm1" and m.metric == "Guest/RAM/Usage/Total")
    assert total.maximum == 2 * 4  # the machine's mapped memory, in kB
    assert "average" in next(m for m in listed if m.metric.endswith(":avg")).description


def test_values_are_the_engines_exact_counts_in_kb(
    collector: MetricsCollector, engine: FusionEngine, memory: Any
) -> None:
    start(engine, memory, "vm-a", zero=2, shared=3, unique=1, seed=1)
    start(engine, memory, "vm-b", zero=1, shared=2, unique=2, seed=2)
    collector.sample_now()
    got = values(collector.query(["*:"], []))
    stats = engine.stats()
    host = stats.host
    assert got[("host", "RAM/VMM/Used")] == (host.frames_used * 4,) == (4 * 4,)
    assert got[("host", "RAM/VMM/Shared")] == (host.pages_saved * 4,) == (4 * 4,)
    assert got[("host", "RAM/VMM/Zero")] == (host.zero_pages * 4,) == (3 * 4,)
    assert got[("host", "RAM/VMM/Free")] == (host.frames_free * 4,)
    for m in stats.machines:
        assert got[(m.machine_id, "Guest/RAM/Usage/Total")] == (m.guest_pages * 4,)
        assert got[(m.machine_id, "Guest/RAM/Usage/Shared")] == (m.shared_pages * 4,)
        assert got[(m.machine_id, "Guest/RAM/Usage/Private")] == (m.private_pages * 4,)
        assert got[(m.machine_id, "Guest/RAM/Usage/Zero")] == (m.zero_pages * 4,)
    assert got[("vm-a", "Guest/RAM/Usage/Total")] == (6 * 4,)
    assert got[("vm-a", "Guest/RAM/Usage/Shared")] == (3 * 4,)
    assert got[("vm-b", "Guest/RAM/Usage/Private")] == (2 * 4,)
    assert all(r.scale == 1 and r.unit == "kB" for r in collector.query([], []))


def test_ring_buffer_keeps_the_newest_samples_oldest_first(
    collector: MetricsCollector, engine: FusionEngine, memory: Any
) -> None:
    collector.setup(["RAM/VMM/Zero"], ["host"], 1, 3)
    expected = []
    for i in range(5):
        start(engine, memory, f"vm{i}", zero=i + 1)
        collector.sample_now()
        expected.append(sum(range(1, i + 2)) * 4)
    assert one(collector, "host", "RAM/VMM/Zero") == tuple(expected[-3:])
    assert one(collector, "host", "RAM/VMM/Zero:min") == (expected[2],)
    assert one(collector, "host", "RAM/VMM/Zero:max") == (expected[4],)
    assert one(collector, "host", "RAM/VMM/Zero:avg") == (sum(expected[-3:]) // 3,)


def test_average_is_integer_division(collector: MetricsCollector, engine: FusionEngine,
                                     memory: Any) -> None:
    collector.setup(["RAM/VMM/Zero"], ["host"], 1, 10)
    collector.sample_now()  # 0 kB
    start(engine, memory, "vm", zero=1)
    collector.sample_now()  # 4 kB
    start(engine, memory, "vm2", zero=1)
    collector.sample_now()  # 8 kB
    start(engine, memory, "vm3", zero=1)
    collector.sample_now()  # 12 kB
    assert one(collector, "host", "RAM/VMM/Zero") == (0, 4, 8, 12)
    assert one(collector, "host", "RAM/VMM/Zero:avg") == (24 // 4,)
    engine.stop_machine("vm3")
    collector.sample_now()  # 8 kB: (0+4+8+12+8) // 5 == 6
    assert one(collector, "host", "RAM/VMM/Zero:avg") == (32 // 5,)


def test_aggregates_of_an_empty_buffer_have_no_value(collector: MetricsCollector) -> None:
    got = values(collector.query(["RAM/VMM/Used*"], ["host"]))
    assert got == {
        ("host", "RAM/VMM/Used"): (),
        ("host", "RAM/VMM/Used:avg"): (),
        ("host", "RAM/VMM/Used:min"): (),
        ("host", "RAM/VMM/Used:max"): (),
    }


def test_tick_samples_each_series_on_its_own_period(
    collector: MetricsCollector, clock: Any
) -> None:
    collector.setup(["RAM/VMM/Used"], ["host"], 2, 10)
    collector.setup(["RAM/VMM/Free"], ["host"], 5, 10)
    # everything is due at once after setup: the two set up and the defaults
    assert collector.tick() == len(HOST_METRICS)
    for _ in range(10):
        clock.advance(1)
        collector.tick()
    # 11 instants 0..10 s: period 2 -> 0,2,4,6,8,10; period 5 -> 0,5,10; period 1 -> all.
    assert len(one(collector, "host", "RAM/VMM/Used")) == 6
    assert len(one(collector, "host", "RAM/VMM/Free")) == 3
    assert len(one(collector, "host", "RAM/VMM/Zero")) == 1  # default count 1
    assert collector.next_due() == clock.now + 1


def test_tick_does_not_catch_up_missed_periods(collector: MetricsCollector, clock: Any) -> None:
    collector.setup([], ["host"], 1, 100)
    collector.tick()
    clock.advance(50)  # the sampler was starved: one sample, not fifty
    collector.tick()
    assert len(one(collector, "host", "RAM/VMM/Used")) == 2
    assert collector.next_due() == clock.now + 1
    assert collector.tick() == 0


def test_setup_discards_samples_and_enable_disable_keep_them(
    collector: MetricsCollector, engine: FusionEngine, memory: Any
) -> None:
    collector.setup(["RAM/VMM/Zero"], ["host"], 1, 5)
    collector.sample_now()
    start(engine, memory, "vm", zero=2, unique=1)
    collector.sample_now()
    assert one(collector, "host", "RAM/VMM/Zero") == (0, 8)

    affected = collector.enable(["RAM/VMM/Zero"], ["host"], False)
    assert [(m.object, m.metric) for m in affected] == [("host", "RAM/VMM/Zero")]
    collector.sample_now()  # disabled: nothing recorded, nothing lost
    assert one(collector, "host", "RAM/VMM/Zero") == (0, 8)
    assert one(collector, "host", "RAM/VMM/Used") == (4,)  # others still collect

    collector.enable(["RAM/VMM/Zero"], ["host"], True)
    collector.sample_now()
    assert one(collector, "host", "RAM/VMM/Zero") == (0, 8, 8)

    listed = collector.setup(["RAM/VMM/Zero"], ["host"], 3, 2)
    assert [(m.period_seconds, m.sample_count) for m in listed] == [(3, 2)]
    assert one(collector, "host", "RAM/VMM/Zero") == ()
    collector.sample_now()
    assert one(collector, "host", "RAM/VMM/Zero") == (8,)
    info = collector.list_metrics(["RAM/VMM/Zero"], ["host"])[0]
    assert (info.period_seconds, info.sample_count) == (3, 2)


@pytest.mark.parametrize(("period", "count"), [(0, 5), (5, 0), (0, 0)])
def test_period_or_count_zero_disables(collector: MetricsCollector, period: int,
                                       count: int) -> None:
    collector.setup(["RAM/VMM/Used"], ["host"], period, count)
    collector.sample_now()
    collector.tick()
    assert one(collector, "host", "RAM/VMM/Used") == ()
    info = collector.list_metrics(["RAM/VMM/Used"], ["host"])[0]
    assert (info.period_seconds, info.sample_count) == (period, count)


def test_setup_affects_base_metrics_only_and_ignores_suffixes(collector: MetricsCollector) -> None:
    affected = collector.setup(["RAM/VMM/Used:avg"], ["host"], 2, 2)
    assert [m.metric for m in affected] == ["RAM/VMM/Used"]
    affected = collector.enable(["RAM/*"], [], False)
    assert [m.metric for m in affected] == HOST_METRICS
    assert collector.setup(["No/Such/Metric"], [], 1, 1) == []


def test_machine_data_appears_on_start_and_is_dropped_on_stop(
    collector: MetricsCollector, engine: FusionEngine, memory: Any
) -> None:
    collector.setup([], [], 1, 5)
    start(engine, memory, "vm", zero=1, unique=2)
    assert one(collector, "vm", "Guest/RAM/Usage/Total") == ()  # known at once, not sampled yet
    collector.sample_now()
    collector.sample_now()
    assert one(collector, "vm", "Guest/RAM/Usage/Total") == (12, 12)

    engine.stop_machine("vm")
    assert collector.query([], ["vm"]) == []  # gone at once, before any sample
    assert not any(m.object == "vm" for m in collector.list_metrics([], []))

    start(engine, memory, "vm", zero=1)
    assert one(collector, "vm", "Guest/RAM/Usage/Total") == ()  # a fresh start: no old data
    collector.sample_now()
    assert one(collector, "vm", "Guest/RAM/Usage/Total") == (4,)


def test_samples_alone_follow_machines_without_a_running_callback(
    engine: FusionEngine, clock: Any, memory: Any
) -> None:
    c = MetricsCollector(engine.stats, clock=clock)
    start(engine, memory, "vm", unique=1)
    assert c.query([], ["vm"]) == []
    c.sample_now()
    assert one(c, "vm", "Guest/RAM/Usage/Private") == (4,)
    engine.stop_machine("vm")
    c.sample_now()
    assert c.query([], ["vm"]) == []


def test_stale_stats_do_not_bring_a_stopped_machine_back(
    engine: FusionEngine, clock: Any, memory: Any
) -> None:
    collector: MetricsCollector

    def stale_stats() -> Any:
        stats = engine.stats()  # the machine is still running here
        if "vm" in engine.running_machines():
            engine.stop_machine("vm")
            collector.sync()  # a request sees the stop while the sampler holds old figures
        return stats

    collector = MetricsCollector(stale_stats, running=engine.running_machines, clock=clock)
    start(engine, memory, "vm", unique=1)
    collector.sync()
    collector.sample_now()
    assert collector.query([], ["vm"]) == []
    assert one(collector, "host", "RAM/VMM/Used") == (4,)  # the host part of the sample stands


def test_setup_rules_apply_to_machines_that_start_later(
    collector: MetricsCollector, engine: FusionEngine, memory: Any
) -> None:
    collector.setup([], [], 2, 7)
    collector.setup(["Guest/RAM/Usage/Zero"], ["late"], 3, 4)
    collector.enable(["*/Private"], [], False)
    collector.setup([], ["host"], 9, 9)  # host only: machines keep the earlier rules
    start(engine, memory, "late", zero=1)
    start(engine, memory, "other", zero=1)
    info = {(m.object, m.metric): m for m in collector.list_metrics(["*:"], [])}
    assert (info["late", "Guest/RAM/Usage/Total"].period_seconds,
            info["late", "Guest/RAM/Usage/Total"].sample_count) == (2, 7)
    assert (info["late", "Guest/RAM/Usage/Zero"].period_seconds,
            info["late", "Guest/RAM/Usage/Zero"].sample_count) == (3, 4)
    assert (info["other", "Guest/RAM/Usage/Zero"].period_seconds,
            info["other", "Guest/RAM/Usage/Zero"].sample_count) == (2, 7)
    assert info["host", "RAM/VMM/Used"].period_seconds == 9
    collector.sample_now()
    assert one(collector, "late", "Guest/RAM/Usage/Private") == ()  # disabled by the rule
    assert one(collector, "late", "Guest/RAM/Usage/Zero") == (4,)


@pytest.mark.parametrize(
    ("names", "objects", "expected"),
    [
        (["RAM/VMM/Used"], [], [("host", "RAM/VMM/Used")]),
        (["ram/vmm/used"], ["host"], [("host", "RAM/VMM/Used")]),
        (["RAM/VMM/Used:"], [], [("host", "RAM/VMM/Used")]),
        (["RAM/VMM/Used:*"], [], [("host", f"RAM/VMM/Used:{a}") for a in ("avg", "min", "max")]),
        (["RAM/VMM/Used:MAX"], [], [("host", "RAM/VMM/Used:max")]),
        (["*:"], ["host"], [("host", n) for n in HOST_METRICS]),
        (["*/Total"], [], [("vm1", "Guest/RAM/Usage/Total"), ("vm2", "Guest/RAM/Usage/Total")]),
        (["Guest/RAM/Usage/?otal"], ["vm2"], [("vm2", "Guest/RAM/Usage/Total")]),
        (["*/Zero:avg"], ["machines/vm1"], [("vm1", "Guest/RAM/Usage/Zero:avg")]),
        (["*/Zero"], ["vm*", "host"], [("host", "RAM/VMM/Zero"), ("vm1", "Guest/RAM/Usage/Zero"),
                                       ("vm2", "Guest/RAM/Usage/Zero")]),
        (["No/Such/Metric"], [], []),
        (["RAM/VMM/Used"], ["vm1"], []),
        (["*"], ["nothing*"], []),
    ],
)
def test_patterns(collector: MetricsCollector, engine: FusionEngine, memory: Any,
                  names: list[str], objects: list[str],
                  expected: list[tuple[str, str]]) -> None:
    start(engine, memory, "vm1", zero=1)
    start(engine, memory, "vm2", zero=1)
    assert [(r.object, r.metric) for r in collector.query(names, objects)] == expected
    listed = [(m.object, m.metric) for m in collector.list_metrics(names, objects)]
    assert listed == expected


def test_everything_is_base_metrics_and_aggregates(collector: MetricsCollector) -> None:
    rows = collector.query([], [])
    assert len(rows) == len(HOST_METRICS) * 4
    assert [r.metric for r in collector.query(["*"], [])] == [r.metric for r in rows]


@pytest.mark.parametrize(
    ("names", "objects", "code", "field"),
    [
        (["RAM/VMM/Used:median"], [], grpc.StatusCode.INVALID_ARGUMENT, "metric_names[0]"),
        (["*", "a:b:c"], [], grpc.StatusCode.INVALID_ARGUMENT, "metric_names[1]"),
        ([" "], [], grpc.StatusCode.INVALID_ARGUMENT, "metric_names[0]"),
        (["x" * 300], [], grpc.StatusCode.INVALID_ARGUMENT, "metric_names[0]"),
        ([], ["Bad_Id"], grpc.StatusCode.INVALID_ARGUMENT, "objects[0]"),
        ([], ["host", ""], grpc.StatusCode.INVALID_ARGUMENT, "objects[1]"),
    ],
)
def test_malformed_requests_are_invalid_argument(
    collector: MetricsCollector, names: list[str], objects: list[str],
    code: grpc.StatusCode, field: str,
) -> None:
    for call in (
        lambda: collector.query(names, objects),
        lambda: collector.list_metrics(names, objects),
        lambda: collector.enable(names, objects),
    ):
        with pytest.raises(ApiError) as info:
            call()
        assert info.value.code == code
        assert info.value.message.startswith(field)


def test_unknown_machines_are_not_found_when_the_inventory_is_known(
    engine: FusionEngine, clock: Any
) -> None:
    c = MetricsCollector.for_engine(engine, known=lambda machine_id: machine_id == "known",
                                    clock=clock)
    assert c.query([], ["known"]) == []  # registered but not running: nothing to report
    with pytest.raises(ApiError) as info:
        c.query([], ["stranger"])
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "machines/stranger" in info.value.message
    assert c.query([], ["str*"]) == []  # a pattern may match nothing


@pytest.mark.parametrize(
    ("period", "count", "field"),
    [(MAX_PERIOD + 1, 1, "period_seconds"), (1, MAX_COUNT + 1, "sample_count")],
)
def test_setup_bounds(collector: MetricsCollector, period: int, count: int, field: str) -> None:
    with pytest.raises(ApiError) as info:
        collector.setup([], [], period, count)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith(field)


def test_listeners_hear_each_sample_and_the_close(collector: MetricsCollector) -> None:
    heard: list[frozenset[tuple[str, str]]] = []
    collector.add_listener(heard.append)
    collector.setup(["RAM/VMM/Used"], ["host"], 1, 1)
    collector.enable([n for n in HOST_METRICS if n != "RAM/VMM/Used"], [], False)
    collector.sample_now()
    assert heard == [frozenset({("host", "RAM/VMM/Used")})]
    collector.close()
    assert collector.closed and heard[-1] == frozenset()
    collector.remove_listener(heard.append)


# -- the identity inside every sample ------------------------------------------------

machine_pages = st.tuples(
    st.integers(0, 4), st.integers(0, 4), st.integers(0, 4), st.booleans(), st.booleans()
)


def check_latest_sample(c: MetricsCollector, engine: FusionEngine) -> None:
    """The newest value of every series is one sample: check it adds up, exactly."""
    latest = {key: v[-1] for key, v in values(c.query(["*:"], [])).items()}
    machines = sorted({obj for obj, _ in latest} - {"host"})
    assert machines == engine.running_machines()
    total = sum(latest[m, "Guest/RAM/Usage/Total"] for m in machines)
    assert total == (latest["host", "RAM/VMM/Used"] + latest["host", "RAM/VMM/Shared"]
                     + latest["host", "RAM/VMM/Zero"])
    for m in machines:
        assert latest[m, "Guest/RAM/Usage/Total"] == (
            latest[m, "Guest/RAM/Usage/Shared"] + latest[m, "Guest/RAM/Usage/Private"]
            + latest[m, "Guest/RAM/Usage/Zero"]
        )
    stats = engine.stats()  # nothing changed since the sample: the same figures
    assert latest["host", "RAM/VMM/Used"] == stats.host.frames_used * 4
    assert latest["host", "RAM/VMM/Shared"] == stats.host.pages_saved * 4
    for m in stats.machines:
        assert latest[m.machine_id, "Guest/RAM/Usage/Shared"] == m.shared_pages * 4


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(machines=st.lists(machine_pages, min_size=1, max_size=5), stops=st.sets(st.integers(0, 4)))
def test_total_over_machines_is_used_plus_shared_plus_zero_in_every_sample(
    clock: Any, memory: Any, machines: list[tuple[int, int, int, bool, bool]], stops: set[int]
) -> None:
    engine = FusionEngine(max_pool_bytes=16 << 20, hash_seed=3)
    try:
        c = MetricsCollector.for_engine(engine, clock=clock)
        c.setup([], [], 1, 20)
        for i, (zero, shared, unique, fusion, same_seed) in enumerate(machines):
            engine.start_machine(
                f"vm{i}", memory(zero=zero, shared=shared, unique=unique,
                                 seed=1 if same_seed else i + 2),
                page_fusion=fusion,
            )
            c.sample_now()
            check_latest_sample(c, engine)
        for i in sorted(stops):
            if f"vm{i}" in engine.running_machines():
                engine.stop_machine(f"vm{i}")
                c.sample_now()
                check_latest_sample(c, engine)
    finally:
        engine.close()


def test_the_sampler_samples_off_the_request_path_and_stops(engine: FusionEngine,
                                                            memory: Any) -> None:
    start(engine, memory, "vm", unique=2)
    collector = MetricsCollector.for_engine(engine)  # the real clock

    async def run() -> list[frozenset[tuple[str, str]]]:
        heard: list[frozenset[tuple[str, str]]] = []
        sampled = asyncio.Event()
        loop = asyncio.get_running_loop()

        def listener(keys: frozenset[tuple[str, str]]) -> None:
            heard.append(keys)
            loop.call_soon_threadsafe(sampled.set)

        collector.add_listener(listener)
        sampler = Sampler(collector)
        sampler.start()
        await asyncio.wait_for(sampled.wait(), 30)  # a guard, not a timing
        await sampler.stop()
        after_stop = len(heard)
        collector.setup([], [], 1, 1)  # would wake a running sampler
        await asyncio.sleep(0)
        assert len(heard) == after_stop
        return heard

    heard = asyncio.run(run())
    assert ("vm", "Guest/RAM/Usage/Total") in heard[0]  # the first tick samples everything
    assert one(collector, "vm", "Guest/RAM/Usage/Total") == ()  # setup after stop discarded it
