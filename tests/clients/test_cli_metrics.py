"""`pagefusion metrics ...`: VBoxManage's arguments and output shapes.

Run against a scripted PerformanceService (exact data, recorded requests),
so the shapes are checked independently of the server's collector.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from clients_support import Cli, Fake


def test_query_prints_vboxmanage_table(fake: Fake) -> None:
    out = fake.cli().ok("metrics", "query")
    assert out.splitlines() == [
        "Object          Metric                                   Values",
        "--------------- ---------------------------------------- "
        "--------------------------------------------",
        "host            RAM/VMM/Used                             524288 kB, 524292 kB",
        "w10             Guest/CPU/Load/User                      12.34%",
    ]
    name, request = fake.performance.requests[-1]
    assert name == "QueryMetrics"
    assert list(request.objects) == [] and list(request.metric_names) == []


@pytest.mark.parametrize(
    ("args", "objects", "names"),
    [
        (["*"], [], []),
        (["host"], ["host"], []),
        (
            ["host", "RAM/VMM/Used,RAM/VMM/Shared:avg"],
            ["host"],
            ["RAM/VMM/Used", "RAM/VMM/Shared:avg"],
        ),
        (["w10", "Guest/RAM/Usage/*"], ["w10"], ["Guest/RAM/Usage/*"]),
        (["machines/w10", "*"], ["w10"], []),
        (["*", "RAM/VMM/Used:max"], [], ["RAM/VMM/Used:max"]),
    ],
)
def test_object_and_metric_arguments(
    fake: Fake, args: list[str], objects: list[str], names: list[str]
) -> None:
    fake.cli().ok("metrics", "query", *args)
    _, request = fake.performance.requests[-1]
    assert list(request.objects) == objects
    assert list(request.metric_names) == names


def test_list_columns(fake: Fake) -> None:
    lines = fake.cli().ok("metrics", "list", "host").splitlines()
    assert lines[0].split() == [
        "Object",
        "Metric",
        "Unit",
        "Minimum",
        "Maximum",
        "Period",
        "Count",
        "Description",
    ]
    assert re.fullmatch(r"-{15} -{40} -{4} -{10} -{10} -{10} -{10} -{11}", lines[1])
    assert lines[2] == (
        "host            RAM/VMM/Used                             kB            0 2147483647"
        "          1          1 description of RAM/VMM/Used"
    )
    assert len(lines) == 2 + len(fake.performance.metrics)


def test_setup_passes_period_and_samples(fake: Fake) -> None:
    assert fake.cli().ok("metrics", "setup", "--period", "5", "--samples", "12", "host") == ""
    name, request = fake.performance.requests[-1]
    assert name == "SetupMetrics"
    assert (request.period_seconds, request.sample_count) == (5, 12)
    assert list(request.objects) == ["host"]


def test_setup_enable_list_affected(fake: Fake) -> None:
    out = fake.cli().ok("metrics", "setup", "--list")
    assert out == (
        "The following metrics were modified:\n\n"
        "Object     Metric\n"
        "---------- --------------------\n"
        "host       RAM/VMM/Used        \n"
        "host       RAM/VMM/Shared      \n\n"
    )
    _, request = fake.performance.requests[-1]
    assert (request.period_seconds, request.sample_count) == (1, 1)  # VBoxManage's defaults
    out = fake.cli().ok("metrics", "enable", "--list", "host", "RAM/VMM/Used")
    assert "host       RAM/VMM/Used" in out
    assert fake.performance.requests[-1][0] == "EnableMetrics"


def test_disable_with_nothing_matching(fake: Fake) -> None:
    # without --list: silent success; with --list, VBoxManage's complaint
    assert fake.cli().ok("metrics", "disable", "host", "Nothing/*") == ""
    line = fake.cli().fails("metrics", "disable", "--list", "host", "Nothing/*")
    assert line == "pagefusion: error: No metrics match the specified filter!"


def test_query_json(fake: Fake) -> None:
    data = json.loads(fake.cli().ok("--json", "metrics", "query"))
    assert data["data"][0]["object"] == "host"
    assert data["data"][0]["values"] == ["524288", "524292"]


def test_collect_streams_timestamped_rows_until_sigterm(fake: Fake) -> None:
    process = fake.cli().popen("metrics", "collect", "--period", "2", "--samples", "3", "host")
    assert process.stdout is not None
    header = process.stdout.readline()
    assert header == "Time stamp   Object     Metric               Value\n"
    rows: list[str] = []
    while len(rows) < 4:
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        rows.append(line.rstrip("\n"))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert rows[0] == "------------ ---------- -------------------- --------------------"
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} host       RAM/VMM/Used         524288 kB, 524292 kB", rows[1]
    )
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} w10        Guest/CPU/Load/User  12\.34%", rows[2])
    setup = [r for n, r in fake.performance.requests if n == "SetupMetrics"][-1]
    assert (setup.period_seconds, setup.sample_count) == (2, 3)
    assert [n for n, _ in fake.performance.requests][-1] == "WatchMetrics"


def test_collect_detach_only_sets_up(fake: Fake) -> None:
    started = time.monotonic()
    out = fake.cli().ok("metrics", "collect", "--detach", "--list", "host")
    assert time.monotonic() - started < 30
    assert out.startswith("The following metrics were modified:")
    assert [n for n, _ in fake.performance.requests] == ["SetupMetrics"]


def test_metrics_against_a_real_server(cli: Cli) -> None:
    """The real collector, once served: the CLI's table must parse (else one error line)."""
    result = cli("metrics", "query", "host")
    if result.returncode != 0:
        assert len(result.stderr.splitlines()) == 1
        assert result.stderr.startswith("pagefusion: error: UNIMPLEMENTED")
        pytest.skip("the server does not serve PerformanceService yet")
    lines = result.stdout.splitlines()
    assert lines[0] == "Object          Metric                                   Values"
    for row in lines[2:]:
        assert row[:15].rstrip() == "host"
        assert re.fullmatch(r"(-?\d+ kB)(, -?\d+ kB)*", row[57:]), row
