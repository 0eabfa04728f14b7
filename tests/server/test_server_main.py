"""``pagefusion-server``'s event loop choice when uvloop cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pagefusion.server import main as server_main
from pagefusion.server.auth import ConfigError


@pytest.fixture
def no_uvloop(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError


def test_auto_falls_back_to_asyncio_without_uvloop(no_uvloop):
    assert server_main.loop_factory("auto") is None
    assert server_main.loop_factory("asyncio") is None


def test_uvloop_asked_for_but_missing_is_a_config_error(no_uvloop):
    with pytest.raises(ConfigError, match="--event-loop uvloop: uvloop cannot be imported"):
        server_main.loop_factory("uvloop")


def test_main_refuses_to_start_without_the_asked_for_loop(tmp_path):
    # In a child process: main() configures logging for the whole process.
    child = ("import sys; sys.modules['uvloop'] = None\n"
             "from pagefusion.server.main import main\n"
             "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", child, "--event-loop", "uvloop", "--log-format", "json",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["event"] == "startup_failed"]
    assert failed and "--event-loop asyncio" in failed[0]["error"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was opened


def test_uvloop_is_used_where_installed():
    import uvloop  # a dependency on CPython on Linux

    factory = server_main.loop_factory("auto")
    assert factory is uvloop.new_event_loop
