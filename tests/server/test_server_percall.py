"""The cheap per-RPC path (issue 11): the same lines, ids and answers as the general one.

:class:`FastLogger` renders the per-RPC line itself while the JSON chain of
``configure_logging`` is in force: its text must be the chain's, and any
other configuration must reach structlog. The request id minted per call
must still be a version-4 UUID, and GetFusionStats' reused encodings must
give the message built field by field.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import structlog
from google.rpc import error_details_pb2

from pagefusion.server import logs
from pagefusion.server.engine import FusionStats, HostStats, MachineStats
from pagefusion.server.fusion import StatsResponses, stats_to_proto
from pagefusion.server.interceptors import new_request_id
from pagefusion.v1 import fusion_pb2, guest_memory_pb2, machine_pb2

RPC_FIELDS = {"method": "/pagefusion.v1.MachineService/GetMachine",
              "request_id": 'r-"7"\\\n\u00e9', "code": "NOT_FOUND", "duration_ms": 0.125}


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """The buffer :func:`configure` makes the log's stderr; structlog's defaults restored after."""
    yield io.StringIO()
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def configure(stderr: io.StringIO, log_format: logs.LogFormat = "json",
              level: int = logging.INFO) -> None:
    """configure_logging with ``stderr`` as sys.stderr (pytest swaps sys.stderr between phases)."""
    real, sys.stderr = sys.stderr, stderr
    try:
        logs.configure_logging(log_format, level)
    finally:
        sys.stderr = real


def _without_time(line: str) -> str:
    return re.sub(r'"timestamp": "[^"]*"', '"timestamp": T', line)


def _chain_and_fast(stderr: io.StringIO, level: int, **fields: object) -> tuple[str, str]:
    """The line structlog's chain writes and the line FastLogger writes, for the same call."""
    logs.log_safely(structlog.get_logger("t"), level, "rpc", **fields)
    logs.FastLogger("t").log(level, "rpc", **fields)
    chain, fast = stderr.getvalue().splitlines()[-2:]
    return chain, fast


@pytest.mark.parametrize("level", [logging.INFO, logging.ERROR])
def test_the_fast_line_is_the_chains_line(stderr: io.StringIO, level: int) -> None:
    configure(stderr)
    structlog.contextvars.bind_contextvars(machine="m1", attempt=2, request_id="shadowed")
    chain, fast = _chain_and_fast(stderr, level, **RPC_FIELDS)
    assert _without_time(fast) == _without_time(chain)
    record = json.loads(fast)
    keys = list(record)  # context variables come in the context's own order
    assert keys[:5] == ["method", "request_id", "code", "duration_ms", "event"]
    assert set(keys[5:7]) == {"machine", "attempt"} and keys[7:] == ["level", "timestamp"]
    assert record["request_id"] == RPC_FIELDS["request_id"]  # the call's, not the context's
    assert record["level"] == logging.getLevelName(level).lower()


@pytest.mark.parametrize("fields", [
    {"path": Path("/x")},  # needs the renderer's fallback (repr)
    {"ratio": float("nan"), "none": None, "flag": True, "big": 1 << 70},
    {"exc_info": ValueError("boom")},  # the traceback renderer's job
])
def test_unusual_fields_give_the_chains_line(stderr: io.StringIO, fields: dict) -> None:
    configure(stderr)
    chain, fast = _chain_and_fast(stderr, logging.ERROR, **fields)
    assert _without_time(fast) == _without_time(chain)


def test_the_timestamp_is_iso_utc_now(stderr: io.StringIO) -> None:
    configure(stderr)
    logs.FastLogger("t").log(logging.INFO, "rpc", **RPC_FIELDS)
    stamp = json.loads(stderr.getvalue().splitlines()[-1])["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp)
    written = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - written) < timedelta(minutes=1)


def test_the_level_filter_applies(stderr: io.StringIO) -> None:
    configure(stderr, level=logging.WARNING)
    fast = logs.FastLogger("t")
    fast.log(logging.INFO, "rpc", **RPC_FIELDS)
    fast.log(logging.ERROR, "rpc", **RPC_FIELDS)
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [line["level"] for line in lines] == ["error"]


def test_capture_logs_sees_fast_lines(stderr: io.StringIO) -> None:
    configure(stderr)
    with structlog.testing.capture_logs() as captured:
        logs.FastLogger("t").log(logging.INFO, "rpc", **RPC_FIELDS)
    assert captured == [{**RPC_FIELDS, "event": "rpc", "log_level": "info"}]
    assert stderr.getvalue() == ""
    logs.FastLogger("t").log(logging.INFO, "rpc", **RPC_FIELDS)  # the chain is back
    assert json.loads(stderr.getvalue())["event"] == "rpc"


def test_other_configurations_go_through_structlog(stderr: io.StringIO) -> None:
    configure(stderr, "console")
    logs.FastLogger("t").log(logging.INFO, "rpc", **RPC_FIELDS)
    assert "rpc" in stderr.getvalue() and not stderr.getvalue().startswith("{")
    configure(stderr)
    seen: list[dict] = []

    def keep(logger: object, method: str, event: dict) -> str:
        seen.append(event)
        return "kept"

    structlog.configure(processors=[keep])  # an embedding application's chain
    logs.FastLogger("t").log(logging.INFO, "rpc", **RPC_FIELDS)
    assert seen == [{**RPC_FIELDS, "event": "rpc"}]


def test_a_failing_output_is_counted_not_raised(stderr: io.StringIO) -> None:
    stderr.close()  # configure_logging's file: every write fails
    configure(stderr)
    before = logs.dropped_lines()
    logs.FastLogger("t").log(logging.INFO, "rpc", **RPC_FIELDS)
    assert logs.dropped_lines() - before == 1


def test_minted_request_ids_are_uuid4_hex() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for request_id in ids:
        parsed = uuid.UUID(hex=request_id)
        assert parsed.hex == request_id
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


def test_an_rpc_line_per_call_through_the_fast_path(api, stderr: io.StringIO) -> None:
    configure(stderr)
    with pytest.raises(grpc.RpcError):
        api.machines.GetMachine(machine_pb2.GetMachineRequest(name="machines/ghost"),
                                metadata=[("x-request-id", "r-9")])
    api.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest())
    # The same method again (its wrapped handler is kept): each call's own id.
    api.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest(),
                              metadata=[("x-request-id", "s-1")])
    api.fusion.GetFusionStats(fusion_pb2.GetFusionStatsRequest())
    deadline = time.monotonic() + 10  # the server's loop writes the lines soon after
    while True:
        rpcs = [json.loads(line) for line in stderr.getvalue().splitlines()
                if '"event": "rpc"' in line]
        if len(rpcs) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    stats = "/pagefusion.v1.FusionService/GetFusionStats"
    assert [(r["method"], r["code"], r["level"]) for r in rpcs] == [
        ("/pagefusion.v1.MachineService/GetMachine", "NOT_FOUND", "info"),
        (stats, "OK", "info"), (stats, "OK", "info"), (stats, "OK", "info"),
    ]
    ids = [r["request_id"] for r in rpcs]
    assert ids[0] == "r-9" and ids[2] == "s-1"
    assert uuid.UUID(hex=ids[1]).version == 4 and uuid.UUID(hex=ids[3]).version == 4
    assert len(set(ids)) == 4
    assert all(r["duration_ms"] >= 0 for r in rpcs)


def _machine(machine_id: str, seed: int) -> MachineStats:
    return MachineStats(machine_id, guest_pages=seed * 7919, zero_pages=seed % 3,
                        private_pages=seed << 40, shared_pages=seed * 3, volatile_pages=seed % 2)


def _host(seed: int) -> HostStats:
    return HostStats(*(seed * (i + 1) << (i * 5) for i in range(11)))


def test_stats_responses_equal_the_field_by_field_message() -> None:
    builder = StatsResponses()
    # An entry longer than 127 bytes (a two-byte length): the longest id, the largest counts.
    big = MachineStats("m" + "x" * 62, *((1 << 64) - 1 - i for i in range(5)))
    steps = [
        FusionStats(_host(0), ()),
        FusionStats(_host(1), (_machine("b", 1), _machine("a", 2))),
        FusionStats(_host(1), (_machine("a", 2), _machine("b", 1))),  # unchanged: reused
        FusionStats(_host(2), (_machine("a", 3), _machine("b", 1), big)),
        FusionStats(_host(3), (big,)),
        FusionStats(_host(0), (_machine("a", 0),)),
    ]
    for stats in steps:
        built = builder.build(stats)
        assert built == stats_to_proto(stats)
        assert [m.name for m in built.machines] == sorted(m.name for m in built.machines)
    again = FusionStats(_host(0), (_machine("a", 0),))  # equal to the last, not the same
    assert builder.build(again) is builder.build(steps[-1])
    changed = FusionStats(_host(0), (_machine("a", 1),))
    assert builder.build(changed) == stats_to_proto(changed) != stats_to_proto(again)
    assert len(builder.build(steps[3]).machines[2].SerializeToString()) > 127


def test_names_seen_before_answer_as_the_first_time(api, expect_failure) -> None:
    api.create("vm")
    api.start("vm")
    good = guest_memory_pb2.ReadGuestMemoryRequest(name="machines/vm", address=0, length=0)
    for _ in range(2):  # the second call takes the kept id: the same error, naming the machine
        failure = expect_failure(api.guest.ReadGuestMemory, good, grpc.StatusCode.INVALID_ARGUMENT)
        assert failure.field_violations() == ["length"]
        info = failure.detail(error_details_pb2.ErrorInfo)
        assert info.metadata["resource"] == "machines/vm"
    bad = guest_memory_pb2.GetPageInfoRequest(name="machines/Not_An_Id")
    for _ in range(2):  # malformed names are never kept
        failure = expect_failure(api.guest.GetPageInfo, bad, grpc.StatusCode.INVALID_ARGUMENT)
        assert failure.field_violations() == ["name"]
    api.stop("vm")
    stopped = guest_memory_pb2.GetPageInfoRequest(name="machines/vm")
    expect_failure(api.guest.GetPageInfo, stopped, grpc.StatusCode.FAILED_PRECONDITION)


def test_a_forked_child_mints_other_request_ids() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without pytest's teardown
        os.write(write_end, "".join(new_request_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode()
    parent = "".join(new_request_id() for _ in range(4))
    assert len(child) == len(parent) == 128 and child != parent


# -- lines taken on an event loop: written together, soon after ------------------

#: Long enough for the write FastLogger schedules (FLUSH_SECONDS after a first
#: line) to come first: the loop runs its timers in the order they fall due.
AFTER_FLUSH = logs.FLUSH_SECONDS * 3


def test_lines_on_a_loop_wait_then_are_the_chains_lines(stderr: io.StringIO) -> None:
    configure(stderr)

    async def calls() -> tuple[str, str]:
        token = structlog.contextvars.bind_contextvars(machine="m1")
        logs.FastLogger("t").log(logging.INFO, "rpc", **RPC_FIELDS)
        logs.FastLogger("t").log(logging.ERROR, "rpc", **{**RPC_FIELDS, "code": "INTERNAL"})
        structlog.contextvars.reset_contextvars(**token)  # the line keeps the call's context
        await asyncio.sleep(0)
        held = stderr.getvalue()
        await asyncio.sleep(AFTER_FLUSH)
        return held, stderr.getvalue()

    before = time.time()
    held, written = asyncio.run(calls())
    assert held == ""
    fast = written.splitlines()
    assert len(fast) == 2
    structlog.contextvars.bind_contextvars(machine="m1")
    logs.log_safely(structlog.get_logger("t"), logging.INFO, "rpc", **RPC_FIELDS)
    chain = stderr.getvalue().splitlines()[-1]
    assert _without_time(fast[0]) == _without_time(chain)
    assert [json.loads(line)["code"] for line in fast] == ["NOT_FOUND", "INTERNAL"]
    assert json.loads(fast[1])["level"] == "error"
    stamp = datetime.fromisoformat(json.loads(fast[0])["timestamp"].replace("Z", "+00:00"))
    assert before - 1 <= stamp.timestamp() <= time.time()  # the call's time, not the write's


def test_other_lines_on_the_loop_keep_the_order_of_the_calls(stderr: io.StringIO) -> None:
    configure(stderr)

    async def calls() -> None:
        fast = logs.FastLogger("t")
        fast.log(logging.INFO, "rpc", **{**RPC_FIELDS, "code": "OK"})
        structlog.get_logger("t").info("machine_started")  # through the chain, at once
        fast.log(logging.INFO, "rpc", **{**RPC_FIELDS, "code": "ABORTED"})
        await asyncio.sleep(AFTER_FLUSH)

    asyncio.run(calls())
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    events = [(line["event"], line.get("code")) for line in lines]
    assert events == [("rpc", "OK"), ("machine_started", None), ("rpc", "ABORTED")]


def test_many_waiting_lines_are_written_without_waiting(stderr: io.StringIO) -> None:
    configure(stderr)

    async def calls() -> list[int]:
        seen = []
        for i in range(logs.MAX_PENDING_LINES + 1):
            logs.FastLogger("t").log(logging.INFO, "rpc", **{**RPC_FIELDS, "duration_ms": i})
            seen.append(len(stderr.getvalue().splitlines()))
        await asyncio.sleep(AFTER_FLUSH)
        return seen

    seen = asyncio.run(calls())
    assert seen[logs.MAX_PENDING_LINES - 2] == 0 and seen[logs.MAX_PENDING_LINES - 1] == (
        logs.MAX_PENDING_LINES)
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [line["duration_ms"] for line in lines] == list(range(logs.MAX_PENDING_LINES + 1))


def test_a_value_only_structlog_renders_is_rendered_by_it_in_order(stderr: io.StringIO) -> None:
    configure(stderr)

    async def calls() -> None:
        fast = logs.FastLogger("t")
        fast.log(logging.INFO, "rpc", **{**RPC_FIELDS, "code": "OK"})
        with structlog.contextvars.bound_contextvars(path=Path("/x")):  # JSONRenderer: repr
            fast.log(logging.INFO, "rpc", **{**RPC_FIELDS, "code": "UNKNOWN"})
        fast.log(logging.INFO, "rpc", **{**RPC_FIELDS, "code": "ABORTED"})
        await asyncio.sleep(AFTER_FLUSH)

    asyncio.run(calls())
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [line["code"] for line in lines] == ["OK", "UNKNOWN", "ABORTED"]
    assert lines[1]["path"] == repr(Path("/x")) and "path" not in lines[2]


def test_lines_waiting_at_exit_are_written(tmp_path: Path) -> None:
    child = (
        "import asyncio, logging\n"
        "from pagefusion.server import logs\n"
        "logs.configure_logging('json')\n"
        "async def last_call():\n"
        "    logs.FastLogger('t').log(logging.INFO, 'rpc', request_id='last')\n"
        "asyncio.run(last_call())\n"  # the loop ends before the write is due
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                            timeout=60, check=True)
    assert [json.loads(line)["request_id"] for line in result.stderr.splitlines()] == ["last"]


def test_lines_a_loop_left_behind_come_before_the_next(stderr: io.StringIO) -> None:
    configure(stderr)
    ended = asyncio.new_event_loop()  # a loop that stops before the write is due
    asyncio.events._set_running_loop(ended)
    try:
        logs.FastLogger("t").log(logging.INFO, "rpc", **{**RPC_FIELDS, "code": "CANCELLED"})
    finally:
        asyncio.events._set_running_loop(None)
    ended.close()
    assert stderr.getvalue() == ""

    async def next_call() -> None:
        logs.FastLogger("t").log(logging.INFO, "rpc", **{**RPC_FIELDS, "code": "OK"})
        await asyncio.sleep(AFTER_FLUSH)

    asyncio.run(next_call())
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [line["code"] for line in lines] == ["CANCELLED", "OK"]


def test_waiting_lines_a_failing_output_refuses_are_each_counted(stderr: io.StringIO) -> None:
    stderr.close()
    configure(stderr)
    before = logs.dropped_lines()

    async def calls() -> None:
        for _ in range(3):
            logs.FastLogger("t").log(logging.INFO, "rpc", **RPC_FIELDS)
        await asyncio.sleep(AFTER_FLUSH)

    asyncio.run(calls())
    assert logs.dropped_lines() - before == 3
