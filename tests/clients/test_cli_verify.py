"""`pagefusion fusion verify`: VerifyFusion's verdict, for people and scripts.

The inconsistent case cannot be produced on a healthy server, so it runs
against a scripted FusionService (as does the consistent case, for the exact
output); a real server's verdict is checked too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from clients_support import Cli, memory_source

from pagefusion.clients import formatting
from pagefusion.v1 import fusion_pb2, fusion_pb2_grpc

PROBLEMS = [
    "frame 17: refcount 3, but 2 guest pages use it",
    "machine vm-a: shared_pages 10, recounted 9",
]


class ScriptedFusion(fusion_pb2_grpc.FusionServiceServicer):
    def __init__(self, reply: fusion_pb2.VerifyFusionResponse) -> None:
        self.reply = reply

    def VerifyFusion(
        self, request: fusion_pb2.VerifyFusionRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.VerifyFusionResponse:
        return self.reply


@contextlib.contextmanager
def scripted(reply: fusion_pb2.VerifyFusionResponse) -> Iterator[Cli]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(ScriptedFusion(reply), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Cli(f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)


def test_format_verify() -> None:
    ok = fusion_pb2.VerifyFusionResponse(consistent=True, pages_checked=1024, frames_checked=300)
    assert formatting.format_verify(ok).splitlines() == [
        "Consistent:                  yes",
        "Pages checked:               1024",
        "Frames checked:              300",
        "Problems:                    0",
    ]
    bad = fusion_pb2.VerifyFusionResponse(
        consistent=False, pages_checked=5, frames_checked=4, problems=PROBLEMS
    )
    lines = formatting.format_verify(bad).splitlines()
    assert lines[0] == "Consistent:                  no"
    assert lines[3:] == ["Problems:                    2", *(f"  {p}" for p in PROBLEMS)]


def test_inconsistent_exits_1_and_lists_each_problem() -> None:
    reply = fusion_pb2.VerifyFusionResponse(
        consistent=False, pages_checked=5, frames_checked=4, problems=PROBLEMS
    )
    with scripted(reply) as cli:
        result = cli("fusion", "verify")
        assert result.returncode == 1, result.stderr
        assert result.stderr == ""
        assert "Consistent:                  no" in result.stdout
        for problem in PROBLEMS:
            assert f"  {problem}" in result.stdout.splitlines()
        as_json = cli("--json", "fusion", "verify")
        assert as_json.returncode == 1
        assert json.loads(as_json.stdout) == {
            "consistent": False, "pages_checked": "5", "frames_checked": "4",
            "problems": PROBLEMS,
        }


def test_consistent_exits_0() -> None:
    reply = fusion_pb2.VerifyFusionResponse(consistent=True, pages_checked=8, frames_checked=6)
    with scripted(reply) as cli:
        assert "Consistent:                  yes" in cli.ok("fusion", "verify")
        assert json.loads(cli.ok("fusion", "verify", "--json"))["consistent"] is True


def test_a_real_server_verifies_consistent(cli: Cli, machine_id: str) -> None:
    for n in (1, 2):
        cli.ok("createvm", "--name", f"{machine_id}-{n}", "--source", memory_source(seed=9),
               "--page-fusion", "on")
        cli.ok("startvm", f"{machine_id}-{n}")
    try:
        host = json.loads(cli.ok("--json", "fusion", "stats"))["host"]
        report = json.loads(cli.ok("--json", "fusion", "verify"))
        assert report["consistent"] is True
        assert report["problems"] == []
        # every mapped guest page and every frame in use was recounted
        assert int(report["pages_checked"]) == int(host["guest_pages"]) > 0
        assert int(report["frames_checked"]) == int(host["frames_used"]) > 0
        text = cli.ok("fusion", "verify")
        assert text.startswith("Consistent:                  yes\n")
    finally:
        for n in (1, 2):
            cli.ok("controlvm", f"{machine_id}-{n}", "poweroff")
            cli.ok("unregistervm", f"{machine_id}-{n}")



@pytest.mark.parametrize("flag", ["--json", None])
def test_unimplemented_is_one_line(flag: str | None) -> None:
    """A server without VerifyFusion: one line naming the code, no traceback."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        args = [a for a in (flag, "fusion", "verify") if a]
        result = Cli(f"127.0.0.1:{port}")(*args)
        assert result.returncode == 1
        assert result.stderr.startswith("pagefusion: error: UNIMPLEMENTED")
        assert len(result.stderr.splitlines()) == 1
    finally:
        server.stop(grace=None)
