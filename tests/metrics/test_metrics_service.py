"""PerformanceService over a real loopback server: the RPCs and the WatchMetrics stream."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from metrics_helpers import WAIT, ServerThread

from pagefusion.server.app import Settings
from pagefusion.v1 import performance_pb2 as pb


def rows(response: pb.QueryMetricsResponse) -> dict[tuple[str, str], list[int]]:
    return {(d.object, d.metric): list(d.values) for d in response.data}


def test_query_reports_the_engines_exact_figures(server: ServerThread) -> None:
    server.start_machine("vm-a", seed=1)
    server.start_machine("vm-b", seed=1)  # same content: fuses with vm-a
    server.perf.SetupMetrics(pb.SetupMetricsRequest(period_seconds=1, sample_count=1))
    server.server.metrics.sample_now()
    response = server.perf.QueryMetrics(pb.QueryMetricsRequest(metric_names=["*:"]))
    got = rows(response)
    stats = server.server.engine.stats()
    assert stats.host.pages_saved > 0
    assert got["host", "RAM/VMM/Used"] == [stats.host.frames_used * 4]
    assert got["host", "RAM/VMM/Free"] == [stats.host.frames_free * 4]
    assert got["host", "RAM/VMM/Shared"] == [stats.host.pages_saved * 4]
    assert got["host", "RAM/VMM/Zero"] == [stats.host.zero_pages * 4]
    for m in stats.machines:
        assert got[m.machine_id, "Guest/RAM/Usage/Total"] == [m.guest_pages * 4] == [256]
        assert got[m.machine_id, "Guest/RAM/Usage/Shared"] == [m.shared_pages * 4]
        assert got[m.machine_id, "Guest/RAM/Usage/Private"] == [m.private_pages * 4]
        assert got[m.machine_id, "Guest/RAM/Usage/Zero"] == [m.zero_pages * 4]
    total = sum(got[m, "Guest/RAM/Usage/Total"][0] for m in ("vm-a", "vm-b"))
    assert total == sum(got["host", n][0] for n in ("RAM/VMM/Used", "RAM/VMM/Shared",
                                                      "RAM/VMM/Zero"))
    assert {(d.unit, d.scale) for d in response.data} == {("kB", 1)}


def test_list_setup_enable_disable(server: ServerThread) -> None:
    server.pause_sampler()  # the buffers' lengths below count the test's own samples
    server.start_machine("vm")
    listed = server.perf.ListMetrics(pb.ListMetricsRequest(objects=["vm"])).metrics
    assert [m.metric for m in listed][:4] == [
        "Guest/RAM/Usage/Total", "Guest/RAM/Usage/Total:avg",
        "Guest/RAM/Usage/Total:min", "Guest/RAM/Usage/Total:max",
    ]
    assert {(m.object, m.unit, m.period_seconds, m.sample_count) for m in listed} == {
        ("vm", "kB", 1, 1)
    }
    assert next(m for m in listed if m.metric == "Guest/RAM/Usage/Total").maximum == 256

    affected = server.perf.SetupMetrics(pb.SetupMetricsRequest(
        metric_names=["Guest/*"], objects=["machines/vm"], period_seconds=5, sample_count=3
    )).metrics
    assert [(m.object, m.metric, m.period_seconds, m.sample_count) for m in affected] == [
        ("vm", n, 5, 3) for n in ("Guest/RAM/Usage/Total", "Guest/RAM/Usage/Shared",
                                  "Guest/RAM/Usage/Private", "Guest/RAM/Usage/Zero")
    ]
    server.server.metrics.sample_now()
    server.server.metrics.sample_now()
    query = pb.QueryMetricsRequest(metric_names=["Guest/RAM/Usage/Total"], objects=["vm"])
    assert rows(server.perf.QueryMetrics(query)) == {("vm", "Guest/RAM/Usage/Total"): [256, 256]}

    disabled = server.perf.DisableMetrics(pb.DisableMetricsRequest(objects=["vm"])).metrics
    assert len(disabled) == 4
    server.server.metrics.sample_now()
    assert rows(server.perf.QueryMetrics(query)) == {("vm", "Guest/RAM/Usage/Total"): [256, 256]}
    server.perf.EnableMetrics(pb.EnableMetricsRequest(objects=["vm"]))
    server.server.metrics.sample_now()
    assert rows(server.perf.QueryMetrics(query)) == {
        ("vm", "Guest/RAM/Usage/Total"): [256, 256, 256]
    }


def test_stopping_a_machine_drops_its_data(server: ServerThread) -> None:
    server.start_machine("vm")
    server.server.metrics.sample_now()
    assert server.perf.QueryMetrics(pb.QueryMetricsRequest(objects=["vm"])).data
    server.stop_machine("vm")
    assert not server.perf.QueryMetrics(pb.QueryMetricsRequest(objects=["vm"])).data
    assert not server.perf.ListMetrics(pb.ListMetricsRequest(objects=["vm"])).metrics


def failure(call: grpc.UnaryUnaryMultiCallable, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value


def test_errors(server: ServerThread) -> None:
    err = failure(server.perf.QueryMetrics,
                  pb.QueryMetricsRequest(metric_names=["RAM/VMM/Used:median"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert [v.field for v in bad.field_violations] == ["metric_names[0]"]

    err = failure(server.perf.ListMetrics, pb.ListMetricsRequest(objects=["no-such-vm"]))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    err = failure(server.perf.SetupMetrics, pb.SetupMetricsRequest(sample_count=10**6))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    stream = server.perf.WatchMetrics(pb.WatchMetricsRequest(objects=["Not An Id"]))
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    # A machine that exists but is not running: nothing to report, not an error.
    server.start_machine("idle")
    server.stop_machine("idle")
    assert not server.perf.QueryMetrics(pb.QueryMetricsRequest(objects=["idle"])).data


def test_watch_streams_a_response_per_sample_until_cancelled(server: ServerThread) -> None:
    server.start_machine("vm")
    server.perf.SetupMetrics(pb.SetupMetricsRequest(period_seconds=1, sample_count=3))
    stream = server.perf.WatchMetrics(pb.WatchMetricsRequest(
        metric_names=["Guest/RAM/Usage/Total", "RAM/VMM/Used:max"], objects=["vm", "host"]
    ))
    messages = [next(stream)]  # the buffers as they are, at once
    for _ in range(3):
        server.server.metrics.sample_now()  # each sample wakes the stream (so may the sampler)
        messages.append(next(stream))
    stream.cancel()
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]

    frames_used_kb = server.server.engine.stats().host.frames_used * 4
    for message in messages:
        assert [(d.object, d.metric) for d in message.data] == [
            ("host", "RAM/VMM/Used:max"), ("vm", "Guest/RAM/Usage/Total")
        ]
        got = rows(message)
        assert got["host", "RAM/VMM/Used:max"] in ([], [frames_used_kb])
        assert set(got["vm", "Guest/RAM/Usage/Total"]) <= {256}
    assert rows(messages[-1])["vm", "Guest/RAM/Usage/Total"] == [256, 256, 256]
    # The server is unharmed and the watch's listener is gone.
    assert server.perf.QueryMetrics(pb.QueryMetricsRequest(objects=["host"])).data
    assert server.server.metrics._listeners == []


def test_watch_ends_cleanly_when_the_server_shuts_down(server: ServerThread) -> None:
    stream = server.perf.WatchMetrics(pb.WatchMetricsRequest(objects=["host"]))
    assert next(stream).data
    ended = threading.Event()
    leftover: list[object] = []

    def drain() -> None:
        leftover.extend(stream)  # ends without error: the status is OK
        ended.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    server.call(server.server.stop(WAIT))  # would wait the whole grace for an open stream
    server.stopped = True
    reader.join(WAIT)
    assert ended.is_set()
    assert stream.code() == grpc.StatusCode.OK  # type: ignore[attr-defined]


def test_without_metrics_listen_there_is_no_exporter_and_the_service_works(
    tmp_path: Path,
) -> None:
    srv = ServerThread(Settings(listen="127.0.0.1:0", data_dir=tmp_path / "data"))
    try:
        assert srv.server.prometheus is None
        srv.start_machine("vm")
        stream = srv.perf.WatchMetrics(pb.WatchMetricsRequest(metric_names=["*/Total"]))
        first = next(stream)
        srv.server.metrics.sample_now()
        second = next(stream)
        stream.cancel()
        assert [d.object for d in second.data] == ["vm"]
        assert list(second.data[0].values) == [256]
        assert len(first.data) == 1
    finally:
        srv.stop()
