"""Prometheus /metrics over HTTP, parsed by prometheus_client's own text parser."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
from metrics_helpers import ServerThread
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pagefusion.server.engine import FusionEngine
from pagefusion.server.prometheus import PrometheusExporter, parse_listen
from pagefusion.v1 import fusion_pb2, machine_pb2
from pagefusion.v1 import performance_pb2 as pb

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "pagefusion-grafana.json"
PAGE = 4096


def scrape(port: int) -> dict[str, list[Sample]]:
    """Sample name -> samples of the /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_engine_figures_match_the_engine_exactly(server: ServerThread) -> None:
    server.start_machine("vm-a", seed=1)
    server.start_machine("vm-b", seed=1)
    server.start_machine("vm-c", size="128KiB", pattern="random", seed=9, fusion=False)
    samples = scrape(server.metrics_port)
    stats = server.server.engine.stats()  # nothing changes between the scrape and here
    host = stats.host
    assert host.pages_saved > 0
    expected = {
        "pagefusion_host_frames_used_bytes": host.frames_used * PAGE,
        "pagefusion_host_free_bytes": host.frames_free * PAGE,
        "pagefusion_host_pages_saved_bytes": host.pages_saved * PAGE,
        "pagefusion_host_zero_bytes": host.zero_pages * PAGE,
        "pagefusion_host_guest_bytes": host.guest_pages * PAGE,
        "pagefusion_host_private_bytes": host.private_pages * PAGE,
        "pagefusion_host_shared_bytes": host.shared_pages * PAGE,
        "pagefusion_host_frames_shared_bytes": host.frames_shared * PAGE,
        "pagefusion_host_volatile_bytes": host.volatile_pages * PAGE,
        "pagefusion_metadata_bytes": host.metadata_bytes,
        "pagefusion_pool_reserved_bytes": host.pool_bytes_reserved,
        "pagefusion_full_scans_total": host.full_scans,
        "pagefusion_machines_running": 3,
    }
    for name, want in expected.items():
        assert value(samples, name) == want, name
    for m in stats.machines:
        for suffix, pages in (("guest", m.guest_pages), ("shared", m.shared_pages),
                              ("private", m.private_pages), ("zero", m.zero_pages),
                              ("volatile", m.volatile_pages)):
            got = value(samples, f"pagefusion_machine_{suffix}_bytes", machine=m.machine_id)
            assert got == pages * PAGE, (m.machine_id, suffix)
    # The accounting identity, inside one scrape.
    guest = sum(s.value for s in samples["pagefusion_machine_guest_bytes"])
    assert guest == (value(samples, "pagefusion_host_frames_used_bytes")
                     + value(samples, "pagefusion_host_pages_saved_bytes")
                     + value(samples, "pagefusion_host_zero_bytes"))
    assert value(samples, "pagefusion_machine_guest_bytes", machine="vm-c") == 128 * 1024


def test_a_stopped_machine_leaves_the_page(server: ServerThread) -> None:
    server.start_machine("vm")
    assert value(scrape(server.metrics_port), "pagefusion_machine_guest_bytes", machine="vm")
    server.stop_machine("vm")
    samples = scrape(server.metrics_port)
    assert "pagefusion_machine_guest_bytes" not in samples
    assert value(samples, "pagefusion_host_frames_used_bytes") == 0
    assert value(samples, "pagefusion_machines_running") == 0


def test_grpc_server_metrics(server: ServerThread) -> None:
    service = "pagefusion.v1.FusionService"
    before = scrape(server.metrics_port)
    # Every method is exported from the start, with zero calls.
    assert value(before, "grpc_server_started_total", grpc_service=service,
                 grpc_method="GetFusionStats") == 0
    for _ in range(3):
        server.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest())
    with pytest.raises(grpc.RpcError):
        server.machines.GetMachine(machine_pb2.GetMachineRequest(name="machines/nope"))
    stream = server.perf.WatchMetrics(pb.WatchMetricsRequest(objects=["host"]))
    next(stream)
    stream.cancel()

    after = scrape(server.metrics_port)
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": "GetFusionStats"}
    assert value(after, "grpc_server_started_total", **labels) == 3
    assert value(after, "grpc_server_handled_total", grpc_code="OK", **labels) == 3
    assert value(after, "grpc_server_handling_seconds_count", **labels) == 3
    assert value(after, "grpc_server_handling_seconds_bucket", le="+Inf", **labels) == 3
    assert value(after, "grpc_server_handled_total", grpc_method="GetMachine",
                 grpc_code="NOT_FOUND") == 1
    watch = {"grpc_type": "server_stream", "grpc_method": "WatchMetrics"}
    assert value(after, "grpc_server_started_total", **watch) == 1
    assert value(after, "grpc_server_msg_sent_total", **watch) >= 1
    # The cancelled stream is counted once it is over; it is over by the next call at the latest.
    server.perf.QueryMetrics(pb.QueryMetricsRequest(objects=["host"]))
    handled = [s for s in scrape(server.metrics_port)["grpc_server_handled_total"]
               if s.labels["grpc_method"] == "WatchMetrics" and s.value]
    assert [s.labels["grpc_code"] for s in handled] in ([], ["CANCELLED"])


def test_process_metrics_are_namespaced(server: ServerThread) -> None:
    samples = scrape(server.metrics_port)
    if "pagefusion_process_resident_memory_bytes" in samples:  # Linux only
        assert value(samples, "pagefusion_process_resident_memory_bytes") > 0


def test_the_grafana_dashboard_uses_only_series_the_server_exports(server: ServerThread) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    server.start_machine("vm")
    server.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest())
    exported = set(scrape(server.metrics_port))
    used: set[str] = set()
    for p in panels:
        assert p["targets"], p["title"]
        for target in p["targets"]:
            used |= set(re.findall(r"\b(?:pagefusion|grpc_server)_[a-z_]+\b", target["expr"]))
    for var in dashboard["templating"]["list"]:
        used |= set(re.findall(r"\b(?:pagefusion|grpc_server)_[a-z_]+\b", var["definition"]))
    optional = {"pagefusion_process_resident_memory_bytes"}  # Linux only
    assert used - exported - optional == set()
    assert {"pagefusion_host_pages_saved_bytes", "pagefusion_machine_guest_bytes",
            "grpc_server_handling_seconds_bucket"} <= used


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:0", ("::1", 0)),
     (":9100", ("127.0.0.1", 9100)), ("0.0.0.0:80", ("0.0.0.0", 80))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9100", "host:", "host:port", "h:70000", ""])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(OSError, match="HOST:PORT"):
        parse_listen(text)


def test_exporter_alone_on_an_engine() -> None:
    engine = FusionEngine(max_pool_bytes=8 << 20, hash_seed=1)
    exporter = PrometheusExporter(engine.stats, "127.0.0.1:0")
    try:
        port = exporter.start()
        assert port > 0
        samples = scrape(port)
        assert value(samples, "pagefusion_host_guest_bytes") == 0
        assert "pagefusion_machine_guest_bytes" not in samples
    finally:
        exporter.stop()
        engine.close()
