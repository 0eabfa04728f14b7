"""The CLI's text shapes, from fixed messages (VBoxManage's layouts)."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import timestamp_pb2

from pagefusion.clients import formatting
from pagefusion.v1 import fusion_pb2, machine_pb2, performance_pb2


def test_metric_value_scale_one_prints_value_space_unit() -> None:
    assert formatting.format_metric_value(524288, 1, "kB") == "524288 kB"


@pytest.mark.parametrize(
    ("value", "scale", "unit", "expected"),
    [
        (12345, 1000, "%", "12.34%"),  # value/scale with two decimals, no space
        (100000, 1000, "%", "100.00%"),
        (5, 1000, "%", "0.00%"),  # integer arithmetic truncates like VBoxManage
        (1999, 100, "MHz", "19.99MHz"),
        (7, 2, "x", "3.50x"),
    ],
)
def test_metric_value_scaled(value: int, scale: int, unit: str, expected: str) -> None:
    assert formatting.format_metric_value(value, scale, unit) == expected


def query_response() -> performance_pb2.QueryMetricsResponse:
    return performance_pb2.QueryMetricsResponse(
        data=[
            performance_pb2.MetricData(
                object="host", metric="RAM/VMM/Used", unit="kB", scale=1, values=[524288, 524292]
            ),
            performance_pb2.MetricData(
                object="w10", metric="Guest/RAM/Usage/Shared:avg", unit="kB", scale=1, values=[8]
            ),
            performance_pb2.MetricData(
                object="w10", metric="Guest/CPU/Load/User", unit="%", scale=1000, values=[12345, 0]
            ),
        ]
    )


def test_metrics_query_table() -> None:
    text = formatting.format_metrics_query(query_response().data)
    assert text.splitlines() == [
        "Object          Metric                                   Values",
        "--------------- ---------------------------------------- "
        "--------------------------------------------",
        "host            RAM/VMM/Used                             524288 kB, 524292 kB",
        "w10             Guest/RAM/Usage/Shared:avg               8 kB",
        "w10             Guest/CPU/Load/User                      12.34%, 0.00%",
    ]
    # object in 15 columns, metric in 40, values oldest first
    row = text.splitlines()[2]
    assert row[:16] == "host".ljust(15) + " "
    assert row[16:57] == "RAM/VMM/Used".ljust(40) + " "


def test_metrics_query_empty_has_header_and_rule() -> None:
    assert formatting.format_metrics_query([]).splitlines() == [
        formatting.QUERY_HEADER,
        formatting.QUERY_RULE,
    ]


def test_metrics_list_table() -> None:
    metrics = [
        performance_pb2.Metric(
            object="host",
            metric="RAM/VMM/Shared",
            unit="kB",
            minimum=0,
            maximum=2147483647,
            period_seconds=1,
            sample_count=5,
            description="Total amount of memory shared between VMs.",
        )
    ]
    assert formatting.format_metrics_list(metrics).splitlines() == [
        "Object          Metric                                   Unit    Minimum    Maximum"
        "     Period      Count Description",
        "--------------- ---------------------------------------- ---- ---------- ----------"
        " ---------- ---------- -----------",
        "host            RAM/VMM/Shared                           kB            0 2147483647"
        "          1          5 Total amount of memory shared between VMs.",
    ]


def test_affected_metrics() -> None:
    metrics = [performance_pb2.Metric(object="host", metric="RAM/VMM/Used")]
    assert formatting.format_affected_metrics(metrics) == (
        "The following metrics were modified:\n\n"
        "Object     Metric\n"
        "---------- --------------------\n"
        "host       RAM/VMM/Used        \n\n"
    )


def test_collect_rows() -> None:
    stamp = formatting.collect_timestamp(dt.datetime(2026, 1, 2, 3, 4, 5, 678901))
    assert stamp == "03:04:05.678"
    text = formatting.format_collect_rows(stamp, query_response().data)
    assert (
        text.splitlines()[0] == "03:04:05.678 host       RAM/VMM/Used         524288 kB, 524292 kB"
    )
    assert formatting.COLLECT_HEADER == "Time stamp   Object     Metric               Value"
    assert formatting.COLLECT_RULE == (
        "------------ ---------- -------------------- --------------------"
    )


def machine(**kw: object) -> machine_pb2.Machine:
    fields: dict[str, object] = {
        "name": "machines/w10",
        "display_name": "Windows 10",
        "memory_size_bytes": 2048 * 1024 * 1024,
        "os_type": "Windows10_64",
        "page_fusion_enabled": True,
        "fusion_domain": "default",
        "memory_source": machine_pb2.MemorySource(
            adapter="synthetic-windows", options={"seed": "7", "profile": "Windows10_64"}
        ),
        "state": machine_pb2.Machine.STATE_RUNNING,
        "create_time": timestamp_pb2.Timestamp(seconds=1767225600),
    }
    fields.update(kw)
    return machine_pb2.Machine(**fields)  # type: ignore[arg-type]


def test_list_vms_shape() -> None:
    text = formatting.format_list_vms([machine(), machine(name="machines/xp", display_name="")])
    assert text == '"Windows 10" {w10}\n"xp" {xp}\n'


def test_showvminfo() -> None:
    stats = fusion_pb2.MachineFusionStats(
        name="machines/w10", guest_pages=512, zero_pages=100, private_pages=12, shared_pages=400
    )
    text = formatting.format_machine_info(machine(), stats)
    lines = text.splitlines()
    assert lines[:10] == [
        "Name:                        Windows 10",
        "ID:                          w10",
        "Resource name:               machines/w10",
        "Guest OS:                    Windows10_64",
        "Memory size:                 2048MB",
        "Page Fusion:                 on",
        "Fusion domain:               default",
        "Memory source:               synthetic-windows:profile=Windows10_64,seed=7",
        "State:                       running",
        "Created:                     2026-01-01T00:00:00Z",
    ]
    assert "Shared pages:                400" in lines
    off = formatting.format_machine_info(
        machine(
            page_fusion_enabled=False,
            state=machine_pb2.Machine.STATE_POWERED_OFF,
            memory_size_bytes=0,
        )
    )
    assert "Page Fusion:                 off" in off.splitlines()
    assert "State:                       powered off" in off.splitlines()
    assert "Memory size:                 from source" in off.splitlines()


def test_machine_readable() -> None:
    text = formatting.format_machine_readable(machine(display_name='say "hi"'))
    assert 'pagefusion="on"' in text.splitlines()
    assert "memory=2048" in text.splitlines()
    assert 'VMState="running"' in text.splitlines()
    assert 'name="say \\"hi\\""' in text.splitlines()


def test_fusion_stats_and_config() -> None:
    stats = fusion_pb2.GetFusionStatsResponse(
        host=fusion_pb2.HostFusionStats(
            guest_pages=1000,
            zero_pages=100,
            private_pages=300,
            shared_pages=600,
            frames_used=400,
            frames_shared=100,
            pages_saved=500,
            metadata_bytes=8192,
            profit_bytes=600 * 4096 - 8192,
        ),
        machines=[fusion_pb2.MachineFusionStats(name="machines/a", guest_pages=1000)],
    )
    text = formatting.format_fusion_stats(stats)
    assert "Profit:                      2.34 MiB (saved + zero - metadata)" in text
    assert "Pages saved:                 500 (1.95 MiB), 50.0% of guest pages" in text
    assert any(line.startswith("a ") and " 1000 " in line for line in text.splitlines())
    config = fusion_pb2.FusionConfig(
        mode=fusion_pb2.FUSION_MODE_HINTS,
        background_scan=True,
        pages_per_second=100,
        stable_scans_before_merge=2,
    )
    assert formatting.format_fusion_config(config).splitlines() == [
        "Mode:                        hints",
        "Background scan:             on",
        "Pages per second:            100",
        "Stable scans before merge:   2",
    ]
