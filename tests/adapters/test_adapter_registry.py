"""Discovery through entry points, option checks, the path guard."""

from __future__ import annotations

import os
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import structlog

from pagefusion.adapters import registry
from pagefusion.adapters.base import (
    Adapter,
    AdapterContext,
    GuestMemory,
    InvalidOptionError,
    InvalidSourceError,
    MemoryRange,
    SourceError,
    SourceNotFoundError,
    SourcePermissionError,
)
from pagefusion.adapters.helpers import open_allowed, resolve_allowed
from pagefusion.adapters.memory import MemoryAdapter

CTX = AdapterContext(machine_id="vm1")


def test_builtins_are_found() -> None:
    adapters = registry.load_adapters()
    assert {"memory", "file", "shm", "synthetic-windows"} <= set(adapters)
    assert isinstance(adapters["memory"], MemoryAdapter)


class _Broken:
    def __init__(self) -> None:
        raise RuntimeError("plugin exploded")


def test_broken_plugin_is_logged_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    group = registry.ENTRY_POINT_GROUP
    eps = [
        EntryPoint("broken-import", "no_such_module_xyz:Adapter", group),
        EntryPoint("broken-init", f"{__name__}:_Broken", group),
        EntryPoint("not-adapter", "os:getcwd", group),
        EntryPoint("memory", "pagefusion.adapters.memory:MemoryAdapter", group),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    with structlog.testing.capture_logs() as logs:
        adapters = registry.load_adapters()
    assert "memory" in adapters
    assert not {"broken-import", "broken-init", "not-adapter"} & set(adapters)
    failed = {e["entry_point"] for e in logs if e["event"] == "adapter_load_failed"}
    assert {"broken-import", "broken-init", "not-adapter"} <= failed
    assert any("plugin exploded" in e["error"] for e in logs)


def test_unknown_adapter_names_known_ones() -> None:
    with pytest.raises(InvalidOptionError) as err:
        registry.open_source("nope", {}, CTX)
    assert err.value.option == "adapter"
    assert "memory" in str(err.value) and "synthetic-windows" in str(err.value)


def test_unknown_option_is_named() -> None:
    with pytest.raises(InvalidOptionError) as err:
        registry.open_source("memory", {"size": "4096", "colour": "red"}, CTX)
    assert err.value.option == "colour"


class _Sloppy(Adapter):
    name = "sloppy"
    options = {"mode": "what goes wrong"}

    def open(self, options, context):  # type: ignore[no-untyped-def]
        if options["mode"] == "crash":
            raise KeyError("oops")

        class Bad(GuestMemory):
            closed = False

            def ranges(self):  # type: ignore[no-untyped-def]
                return [MemoryRange(0x2000, 0x2000), MemoryRange(0x1000, 0x2000)]

            def close(self) -> None:
                Bad.closed = True

        self.bad = Bad
        return Bad()


def test_misbehaving_adapter_is_contained() -> None:
    sloppy = _Sloppy()
    with pytest.raises(SourceError, match="sloppy"):
        registry.open_source("sloppy", {"mode": "crash"}, CTX, {"sloppy": sloppy})
    with pytest.raises(InvalidSourceError, match="overlaps"):
        registry.open_source("sloppy", {"mode": "ranges"}, CTX, {"sloppy": sloppy})
    assert sloppy.bad.closed


def test_resolve_allowed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret"
    outside.write_bytes(b"x" * 4096)
    inside = root / "img"
    inside.write_bytes(b"y" * 4096)
    (root / "link").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path)
    allowed = [root]

    assert resolve_allowed(str(inside), allowed, "path") == inside.resolve()
    assert resolve_allowed(str(root / "sub" / ".." / "img"), allowed, "path") == inside.resolve()
    for escape in (outside, root / ".." / "secret", root / "link", root / "dirlink" / "secret"):
        with pytest.raises(SourcePermissionError) as err:
            resolve_allowed(str(escape), allowed, "path")
        assert err.value.option == "path"
    with pytest.raises(SourcePermissionError):  # a missing file outside leaks nothing
        resolve_allowed(str(tmp_path / "missing"), allowed, "path")
    with pytest.raises(SourceNotFoundError):
        resolve_allowed(str(root / "missing"), allowed, "path")
    with pytest.raises(SourcePermissionError):
        resolve_allowed(str(inside), [], "path")
    with pytest.raises(InvalidOptionError):
        resolve_allowed("relative/img", allowed, "path")
    # a root that is a prefix of another directory's name is not that directory
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "f").write_bytes(b"z")
    with pytest.raises(SourcePermissionError):
        resolve_allowed(str(tmp_path / "root2" / "f"), allowed, "path")


def test_open_allowed_rejects_non_regular(tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="regular"):
        open_allowed(str(tmp_path), [tmp_path], "path")
    f = tmp_path / "f"
    f.write_bytes(b"a")
    fd = open_allowed(str(f), [tmp_path], "path")
    os.close(fd)


def test_gateway_names_a_failed_adapter_with_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    group = registry.ENTRY_POINT_GROUP
    eps = [EntryPoint("broken-import", "no_such_module_xyz:Adapter", group),
           EntryPoint("broken-init", f"{__name__}:_Broken", group),
           EntryPoint("memory", "pagefusion.adapters.memory:MemoryAdapter", group)]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    monkeypatch.setattr(registry, "_FAILURES", {})  # restored after the test
    gateway = registry.AdapterGateway()
    assert "memory" in gateway.adapters
    for name, cause in (("broken-import", "ModuleNotFoundError: No module named "
                                          "'no_such_module_xyz'"),
                        ("broken-init", "RuntimeError: plugin exploded")):
        with pytest.raises(InvalidOptionError) as err:
            gateway.check(name, {})
        assert err.value.option == "adapter"
        assert str(err.value) == f"adapter '{name}' is installed but failed to load: {cause}"
        with pytest.raises(InvalidOptionError, match="failed to load"):
            gateway.open(name, {}, CTX)
    with pytest.raises(InvalidOptionError, match=r"unknown adapter 'nope' \(known adapters: "
                                                 r"file, memory, shm"):
        gateway.check("nope", {})
    with pytest.raises(InvalidOptionError, match="required") as err:
        gateway.check("", {})
    assert err.value.option == "adapter"


def test_gateway_checks_option_values_without_opening(tmp_path: Path) -> None:
    gateway = registry.AdapterGateway()
    missing = str(tmp_path / "not-there-yet")
    assert gateway.check("file", {"path": missing}).name == "file"  # may be written later
    for options, option in (({}, "path"), ({"path": "relative"}, "path"),
                            ({"path": missing, "below_4g": "3G+1"}, "below_4g"),
                            ({"path": missing, "colour": "red"}, "colour")):
        with pytest.raises(InvalidOptionError) as err:
            gateway.check("file", options)
        assert err.value.option == option


class _ExplodingCheck(Adapter):
    name = "exploding"
    options = {"x": "anything"}

    def check_options(self, options):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("bad plugin")


def test_gateway_contains_a_check_that_raises() -> None:
    gateway = registry.AdapterGateway({"exploding": _ExplodingCheck()}, failures={})
    with pytest.raises(InvalidOptionError, match="ZeroDivisionError: bad plugin"):
        gateway.check("exploding", {"x": "1"})
