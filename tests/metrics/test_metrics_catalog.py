"""The metric catalog: PerformanceService and Prometheus serve the same figures."""

from __future__ import annotations

import dataclasses
import urllib.request

from metrics_helpers import ServerThread
from prometheus_client.parser import text_string_to_metric_families

from pagefusion.server.engine.types import FusionStats, HostStats, MachineStats
from pagefusion.server.metrics_catalog import (
    CATALOG,
    PERFORMANCE_METRICS,
    profit_bytes,
)
from pagefusion.server.performance import METRICS, MetricsCollector
from pagefusion.server.prometheus import FusionCollector
from pagefusion.v1 import fusion_pb2
from pagefusion.v1 import performance_pb2 as pb

PAGE = 4096

#: Distinct figures everywhere, so a metric reading the wrong field shows.
HOST = HostStats(
    guest_pages=1000, zero_pages=300, private_pages=200, shared_pages=500, frames_used=400,
    frames_shared=100, pages_saved=300, frames_free=17, volatile_pages=9, full_scans=4,
    metadata_bytes=12_345, pool_bytes_reserved=1 << 30,
)
MACHINES = (
    MachineStats("vm-a", guest_pages=600, zero_pages=100, private_pages=150, shared_pages=350,
                 volatile_pages=5),
    MachineStats("vm-b", guest_pages=400, zero_pages=200, private_pages=50, shared_pages=150,
                 volatile_pages=4),
)
STATS = FusionStats(HOST, MACHINES)


def _prometheus_families() -> dict[str, tuple[str, dict[tuple[str, ...], float]]]:
    """Family name -> (help, {label values: value}) of one FusionCollector scrape."""
    out = {}
    for family in FusionCollector(lambda: STATS).collect():
        samples = {tuple(s.labels.values()): s.value for s in family.samples
                   if not s.name.endswith("_created")}
        out[family.name] = (family.documentation, samples)
    return out


def test_every_performance_metric_comes_from_the_catalog() -> None:
    assert [m.name for m in METRICS] == list(PERFORMANCE_METRICS)
    assert "RAM/VMM/Profit" in PERFORMANCE_METRICS
    for m in METRICS:
        assert m.entry is PERFORMANCE_METRICS[m.name]
        assert m.description == m.entry.description


def test_catalog_entries_match_in_both_exporters() -> None:
    collector = MetricsCollector(lambda: STATS)
    collector.sample_now()
    listed = {(m.object, m.metric): m for m in collector.list_metrics([], [])}
    queried = {(d.object, d.metric): d.values for d in collector.query(["*:"], [])}
    families = _prometheus_families()
    for entry in CATALOG:
        help_text, samples = families[entry.prometheus_name]
        assert help_text == entry.prometheus_help
        assert entry.description.rstrip(".") in help_text
        objects: list[tuple[str, HostStats | MachineStats]] = (
            [("host", HOST)] if entry.kind == "host" else [(m.machine_id, m) for m in MACHINES]
        )
        for obj, source in objects:
            labels = () if entry.kind == "host" else (obj,)
            assert samples[labels] == entry.read(source), entry.prometheus
            if not entry.metric:
                assert not any(name == entry.prometheus for _, name in listed)
                continue
            info = listed[(obj, entry.metric)]
            assert (info.unit, info.description) == ("kB", entry.description)
            # The same figure, in kB on one side and bytes on the other.
            assert queried[(obj, entry.metric)] == (int(samples[labels]) // 1024,)
    # Nothing served that the catalog does not describe.
    performance_names = {name for _, name in listed if ":" not in name}
    assert performance_names == set(PERFORMANCE_METRICS)
    assert set(families) == {e.prometheus_name for e in CATALOG} | {"pagefusion_machines_running"}


def test_profit_is_ksm_general_profit() -> None:
    expected = (HOST.pages_saved + HOST.zero_pages) * PAGE - HOST.metadata_bytes
    assert profit_bytes(HOST) == expected == 2_445_255
    costly = dataclasses.replace(HOST, metadata_bytes=10 << 20)
    assert profit_bytes(costly) == 0  # metadata costs more than fusion saves
    families = _prometheus_families()
    assert families["pagefusion_host_profit_bytes"][1][()] == expected
    collector = MetricsCollector(lambda: STATS)
    collector.sample_now()
    (row,) = collector.query(["RAM/VMM/Profit"], ["host"])
    assert row.values == (expected // 1024,)


def test_profit_agrees_across_the_api_and_prometheus(server: ServerThread) -> None:
    server.start_machine("vm-a", size="4MiB", seed=1)
    server.start_machine("vm-b", size="4MiB", seed=1)
    server.pause_sampler()
    server.server.metrics.sample_now()
    host = server.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest()).host
    assert host.profit_bytes > 0
    assert host.profit_bytes == max(
        0, (host.pages_saved + host.zero_pages) * PAGE - host.metadata_bytes
    )
    reply = server.perf.QueryMetrics(
        pb.QueryMetricsRequest(metric_names=["RAM/VMM/Profit"], objects=["host"])
    )
    assert [list(d.values) for d in reply.data] == [[host.profit_bytes // 1024]]
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    scraped = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert scraped["pagefusion_host_profit_bytes"] == host.profit_bytes
