"""The machine registry: machine definitions and fusion configuration in SQLite.

One database file, ``registry.sqlite3``, in the server's data dir. WAL
journaling with ``synchronous=FULL`` makes every committed change durable
before the RPC that made it returns, so a kill -9 loses nothing that a client
saw succeed. Machines are stored as serialized ``pagefusion.v1.Machine``
messages without their state: memory is RAM, so after a restart every machine
is powered off.

The registry is blocking I/O; the servicers call it through
``asyncio.to_thread``. A lock serialises access to the one connection. An
exclusive lock on ``registry.lock`` keeps a second server off the same data
dir (the kernel drops it when the process dies, even by kill -9).

A write the data dir has no room for raises :class:`StorageFullError` after
rolling back: what was stored before stays, the connection stays usable, and
the next write succeeds once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from pagefusion.server.engine import FusionConfig, FusionMode
from pagefusion.v1 import fusion_pb2, machine_pb2

DB_NAME = "registry.sqlite3"
LOCK_NAME = "registry.lock"
_SCHEMA_VERSION = 1
_FUSION_CONFIG_KEY = "fusion_config"


class StorageFullError(OSError):
    """A registry write found the data dir out of space; nothing was changed.

    Attributes:
        data_dir: the server's data dir.
    """

    def __init__(self, data_dir: Path, cause: str) -> None:
        super().__init__(
            errno.ENOSPC,
            f"the data dir {data_dir} is out of space ({cause}); nothing was changed: "
            "free space there and retry",
        )
        self.data_dir = data_dir


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    return "disk is full" in str(exc)


class Registry:
    """Durable store of machine definitions and the fusion configuration."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.path = data_dir / DB_NAME
        self._lock = threading.Lock()
        self._lock_fd = _lock_data_dir(data_dir / LOCK_NAME)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except BaseException:
            self._db.close()
            os.close(self._lock_fd)
            raise

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > _SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{self.path} has schema version {version}; this server knows {_SCHEMA_VERSION}"
                " (written by a newer pagefusion-server)"
            )
        if version < 1:
            with self._transaction():
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS machines ("
                    " machine_id TEXT PRIMARY KEY, machine BLOB NOT NULL)"
                )
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS settings ("
                    " key TEXT PRIMARY KEY, value BLOB NOT NULL)"
                )
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _transaction(self) -> _Tx:
        self._db.execute("BEGIN IMMEDIATE")
        return _Tx(self._db)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the lock for one write transaction; a full data dir is StorageFullError."""
        with self._lock:
            try:
                with self._transaction():
                    yield
            except sqlite3.Error as exc:
                if _is_full(exc):
                    raise StorageFullError(self.data_dir, str(exc)) from exc
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._lock_fd)

    # machines

    def load_machines(self) -> dict[str, machine_pb2.Machine]:
        """Every stored machine, keyed by id, with state POWERED_OFF."""
        with self._lock:
            rows = self._db.execute("SELECT machine_id, machine FROM machines").fetchall()
        machines = {}
        for machine_id, blob in rows:
            machine = machine_pb2.Machine.FromString(blob)
            machine.state = machine_pb2.Machine.STATE_POWERED_OFF
            machines[machine_id] = machine
        return machines

    def insert_machine(self, machine_id: str, machine: machine_pb2.Machine) -> bool:
        """Store a new machine; False if the id is taken."""
        blob = _stored(machine)
        try:
            with self._writing():
                self._db.execute(
                    "INSERT INTO machines (machine_id, machine) VALUES (?, ?)",
                    (machine_id, blob),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def update_machine(self, machine_id: str, machine: machine_pb2.Machine) -> None:
        blob = _stored(machine)
        with self._writing():
            self._db.execute(
                "UPDATE machines SET machine = ? WHERE machine_id = ?", (blob, machine_id)
            )

    def delete_machine(self, machine_id: str) -> None:
        with self._writing():
            self._db.execute("DELETE FROM machines WHERE machine_id = ?", (machine_id,))

    # fusion configuration

    def load_fusion_config(self) -> FusionConfig | None:
        """The stored configuration, or None if it was never changed."""
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM settings WHERE key = ?", (_FUSION_CONFIG_KEY,)
            ).fetchone()
        if row is None:
            return None
        msg = fusion_pb2.FusionConfig.FromString(row[0])
        return FusionConfig(
            mode=FusionMode(msg.mode),
            background_scan=msg.background_scan,
            pages_per_second=msg.pages_per_second,
            stable_scans_before_merge=msg.stable_scans_before_merge,
        )

    def save_fusion_config(self, config: FusionConfig) -> None:
        msg = fusion_pb2.FusionConfig(
            mode=cast(fusion_pb2.FusionMode, int(config.mode)),
            background_scan=config.background_scan,
            pages_per_second=config.pages_per_second,
            stable_scans_before_merge=config.stable_scans_before_merge,
        )
        with self._writing():
            self._db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (_FUSION_CONFIG_KEY, msg.SerializeToString()),
            )


class _Tx:
    """Context manager committing on success, rolling back on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._rollback()
            return
        try:
            self._db.execute("COMMIT")
        except BaseException:
            # A COMMIT that failed (e.g. SQLITE_FULL) may leave the
            # transaction open: end it so the next write starts clean.
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")


def _lock_data_dir(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(
            f"the data dir {path.parent} is in use by another pagefusion-server"
        ) from None
    return fd


def _stored(machine: machine_pb2.Machine) -> bytes:
    copy = machine_pb2.Machine()
    copy.CopyFrom(machine)
    copy.ClearField("state")
    return copy.SerializeToString()
