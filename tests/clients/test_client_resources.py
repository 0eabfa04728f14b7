"""Resource names and the CLI's value parsers."""

from __future__ import annotations

import pytest

from pagefusion.clients.resources import (
    format_source,
    is_valid_machine_id,
    machine_id_from_display_name,
    machine_id_of,
    machine_name,
    parse_machine_name,
    parse_memory_mb,
    parse_on_off,
    parse_source,
)


def test_machine_name_round_trip() -> None:
    assert machine_name("w10") == "machines/w10"
    assert machine_name("machines/w10") == "machines/w10"
    assert parse_machine_name("machines/w10") == "w10"
    assert machine_id_of("machines/w10") == "w10"
    assert machine_id_of("w10") == "w10"


@pytest.mark.parametrize("bad", ["w10", "machines/", "disks/w10", "machines/a/b", ""])
def test_parse_machine_name_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="machine resource name"):
        parse_machine_name(bad)


@pytest.mark.parametrize(
    ("machine_id", "valid"),
    [
        ("w10", True),
        ("a", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("1abc", False),
        ("Win10", False),
        ("w_10", False),
        ("", False),
        ("web-01", True),
    ],
)
def test_valid_machine_ids(machine_id: str, valid: bool) -> None:
    assert is_valid_machine_id(machine_id) is valid


@pytest.mark.parametrize(
    ("display", "expected"),
    [
        ("Windows 10", "windows-10"),
        ("  XP SP3 (32-bit) ", "xp-sp3-32-bit"),
        ("2019", "vm-2019"),
        ("***", "vm"),
        ("A" * 80, "a" * 63),
    ],
)
def test_machine_id_from_display_name(display: str, expected: str) -> None:
    derived = machine_id_from_display_name(display)
    assert derived == expected
    assert is_valid_machine_id(derived)


def test_parse_source() -> None:
    assert parse_source("synthetic-windows") == ("synthetic-windows", {})
    assert parse_source("file:path=/images/w10.core") == ("file", {"path": "/images/w10.core"})
    assert parse_source("memory:size=64MiB,pattern=mixed,seed=3") == (
        "memory",
        {"size": "64MiB", "pattern": "mixed", "seed": "3"},
    )
    # a piece without '=' continues the previous value, so values may hold commas
    assert parse_source("file:path=/a,b.img") == ("file", {"path": "/a,b.img"})
    # only the first ':' separates the adapter
    assert parse_source("shm:path=/dev/shm/x:y") == ("shm", {"path": "/dev/shm/x:y"})


@pytest.mark.parametrize("bad", ["", ":path=/x", "file:nonsense"])
def test_parse_source_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="--source"):
        parse_source(bad)


def test_format_source_inverts_parse() -> None:
    adapter, options = parse_source("memory:seed=3,pattern=mixed")
    assert format_source(adapter, options) == "memory:pattern=mixed,seed=3"
    assert format_source("synthetic-windows", {}) == "synthetic-windows"


def test_on_off_and_memory() -> None:
    assert parse_on_off("on") is True
    assert parse_on_off("OFF") is False
    with pytest.raises(ValueError, match="on or off"):
        parse_on_off("maybe")
    assert parse_memory_mb("2048") == 2048 * 1024 * 1024
    assert parse_memory_mb("0") == 0
    for bad in ("-1", "1.5", "2G"):
        with pytest.raises(ValueError, match="--memory"):
            parse_memory_mb(bad)
