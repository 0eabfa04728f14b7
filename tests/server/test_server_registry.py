"""The SQLite machine registry on its own: durability settings and round trips."""

from __future__ import annotations

import sqlite3

import pytest

from pagefusion.server.engine import FusionConfig, FusionMode
from pagefusion.server.registry import DB_NAME, Registry
from pagefusion.v1 import machine_pb2


def test_round_trip_and_states_come_back_powered_off(tmp_path):
    registry = Registry(tmp_path)
    machine = machine_pb2.Machine(
        name="machines/vm", display_name="d", state=machine_pb2.Machine.STATE_RUNNING
    )
    assert registry.insert_machine("vm", machine)
    assert not registry.insert_machine("vm", machine)  # the id is taken
    machine.display_name = "e"
    registry.update_machine("vm", machine)
    registry.insert_machine("gone", machine_pb2.Machine(name="machines/gone"))
    registry.delete_machine("gone")
    registry.save_fusion_config(FusionConfig(mode=FusionMode.HINTS, pages_per_second=7))
    registry.close()

    reopened = Registry(tmp_path)
    machines = reopened.load_machines()
    assert list(machines) == ["vm"]
    assert machines["vm"].display_name == "e"
    assert machines["vm"].state == machine_pb2.Machine.STATE_POWERED_OFF
    assert reopened.load_fusion_config() == FusionConfig(mode=FusionMode.HINTS, pages_per_second=7)
    reopened.close()


def test_fresh_registry_has_no_config(tmp_path):
    registry = Registry(tmp_path)
    assert registry.load_fusion_config() is None
    assert registry.load_machines() == {}
    registry.close()


def test_database_uses_wal(tmp_path):
    Registry(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


def test_newer_schema_is_refused(tmp_path):
    Registry(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="schema version 99"):
        Registry(tmp_path)
    Registry(tmp_path / "other").close()  # and the failed open released its lock
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    Registry(tmp_path).close()
