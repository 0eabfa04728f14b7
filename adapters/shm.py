"""The ``shm`` adapter: live guest RAM in a shared-memory segment or memory file.

Points pagefusion at running guests: a POSIX shared-memory object
(``name=NAME`` for /dev/shm/NAME) or the file behind QEMU's
``-object memory-backend-file,mem-path=...,share=on`` (``path=...``). The
source is live: the engine reads it at start and re-reads it on scans, and
pages that changed are guest writes.

Why reads copy by default: the guest side may shrink or delete the segment
at any moment, and touching a mapping past the new end of its file raises
SIGBUS, which kills the whole server. ``pread`` into our own buffer instead
returns a short count we turn into :class:`SourceError`, so one machine fails
and the others keep running. A copy at memory bandwidth is cheap next to
hashing the pages. ``map=true`` reads through a shared mapping instead (no
copy) after checking the size before each batch; a writer that truncates
the file in the middle of a batch can still crash the server, so it is for
sources whose size nobody changes.

Each read batch also checks that the path still names the file we opened:
a segment that vanished or was replaced is a SourceError, not silently a
stale copy.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Mapping, Sequence

import numpy as np

from pagefusion.adapters.base import (
    PAGE_SIZE,
    Adapter,
    AdapterContext,
    GuestMemory,
    InvalidOptionError,
    InvalidSourceError,
    MemoryRange,
    SourceError,
)
from pagefusion.adapters.helpers import (
    MAX_TOTAL_BYTES,
    RangeLookup,
    give_back_buffer,
    open_allowed,
    page_round_up,
    parse_bool,
    parse_size,
    read_buffer,
)

__all__ = ["SHM_DIR", "ShmAdapter", "ShmGuestMemory"]

SHM_DIR = "/dev/shm"
_4GIB = 4 << 30


class ShmGuestMemory(GuestMemory):
    """A live segment, read in batches by ``pread`` (or through a mapping).

    Args:
        fd: an open descriptor of the segment (owned from now on).
        path: the path it was opened by, checked on every batch.
        below_4g: bytes of the segment that are guest RAM below 4 GiB; the
            rest appears from 4 GiB (a PC's layout). 0: the whole segment
            from address 0.
        use_map: read through a shared mapping instead of ``pread``.
        writable: whether ``write`` may write through to the segment.
        option: the option that named the segment, for error details.
    """

    live = True

    def __init__(self, fd: int, path: str, *, below_4g: int = 0, use_map: bool = False,
                 writable: bool = False, option: str = "path") -> None:
        self.path = path
        self._fd = fd
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        self._size = st.st_size
        if self._size == 0:
            raise InvalidSourceError(f"{path}: the segment is empty", option=option)
        if self._size > MAX_TOTAL_BYTES:
            raise InvalidSourceError(f"{path}: the segment is larger than 1 TiB", option=option)
        padded = page_round_up(self._size)
        if below_4g and below_4g < padded:
            if below_4g % PAGE_SIZE or below_4g > _4GIB:
                raise InvalidOptionError(
                    "option 'below_4g' must be a page multiple of at most 4 GiB", option="below_4g"
                )
            # (guest address, file offset, bytes)
            self._layout = [(0, 0, below_4g), (_4GIB, below_4g, padded - below_4g)]
        else:
            self._layout = [(0, 0, padded)]
        self._ranges = tuple(MemoryRange(a, n) for a, _, n in self._layout)
        self._lookup = RangeLookup(self._ranges)
        self._writable = writable
        self._buffer = np.empty(0, dtype=np.uint8)
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        if use_map:
            self._map = mmap.mmap(fd, self._size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._view = memoryview(self._map)
        self._closed = False

    def ranges(self) -> Sequence[MemoryRange]:
        return self._ranges

    def _check(self, end: int) -> None:
        """Fail unless the path still names our segment and it still holds ``end`` bytes."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise SourceError(f"{self.path}: the segment vanished") from None
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot check the segment: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise SourceError(f"{self.path}: the segment was replaced by another file")
        size = os.fstat(self._fd).st_size
        if size < min(end, self._size):
            raise SourceError(
                f"{self.path}: the segment shrank from {self._size} to {size} bytes"
            )

    def _offset(self, address: int, length: int) -> int:
        guest, offset, _ = self._layout[self._lookup.find(address, length)]
        return offset + address - guest

    def read(self, address: int, length: int) -> memoryview:
        if self._closed:
            raise SourceError(f"{self.path}: source is closed")
        offset = self._offset(address, length)
        end = offset + length
        self._check(end)
        if self._view is not None and end <= self._size:
            return self._view[offset:end]
        if self._buffer.size < length:
            self._buffer = read_buffer(length)
        out = memoryview(self._buffer[:length].data)
        want = min(end, self._size) - offset  # the ragged tail past the end reads as zeros
        done = 0
        while done < want:
            n = os.preadv(self._fd, [out[done:want]], offset + done)
            if n == 0:
                raise SourceError(
                    f"{self.path}: the segment shrank below {offset + want} bytes while reading"
                )
            done += n
        if want < length:
            self._buffer[want:length] = 0
        return out

    def write(self, address: int, data: bytes) -> None:
        """Write through to the segment (option ``writable=true``).

        Raises:
            NotImplementedError: opened read-only (the interface's "optional").
        """
        if not self._writable:
            raise NotImplementedError(f"{self.path}: opened read-only (option writable=true)")
        start = address - address % PAGE_SIZE
        span = page_round_up(address + len(data)) - start
        offset = self._offset(start, span) + address - start
        self._check(offset + len(data))
        os.pwrite(self._fd, data, offset)

    def idle(self) -> None:
        # A running guest holds no read buffer between passes: the next
        # pass, or the next source, takes the spare again.
        give_back_buffer(self._buffer)
        self._buffer = np.empty(0, dtype=np.uint8)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Not given back: a scan may still be reading into it on another
        # thread (a stop does not wait for it), and the next reader must not
        # get a buffer that a read can still write into.
        self._buffer = np.empty(0, dtype=np.uint8)
        if self._view is not None and self._map is not None:
            self._view.release()
            with contextlib.suppress(BufferError):  # a caller's view keeps it until dropped
                self._map.close()
        os.close(self._fd)


class ShmAdapter(Adapter):
    """Live guest RAM in shared memory under the server's --allow-path roots."""

    name = "shm"
    options = {
        "path": "absolute path of a memory file (e.g. QEMU memory-backend-file mem-path)",
        "name": f"name of a POSIX shared-memory object ({SHM_DIR}/NAME)",
        "below_4g": "bytes of guest RAM below 4 GiB; the rest of the file maps from 4 GiB "
        "(default: the whole file from address 0)",
        "map": "true: read through a shared mapping, no copy (unsafe if the segment shrinks)",
        "writable": "true: open read-write so guest-memory writes go through to the segment",
    }

    def open(self, options: Mapping[str, str], context: AdapterContext) -> GuestMemory:
        has_path, has_name = "path" in options, "name" in options
        if has_path == has_name:
            raise InvalidOptionError(
                "exactly one of options 'path' and 'name' is required",
                option="name" if has_name else "path",
            )
        if has_name:
            name = options["name"].lstrip("/")
            if not name or "/" in name or name in (".", ".."):
                raise InvalidOptionError(
                    f"option 'name' must be a shared-memory object name without '/', "
                    f"got {options['name']!r}",
                    option="name",
                )
            path, option = os.path.join(SHM_DIR, name), "name"
        else:
            path, option = options["path"], "path"
        below_4g = parse_size(options, "below_4g", 0)
        use_map = parse_bool(options, "map", False)
        writable = parse_bool(options, "writable", False)
        fd = open_allowed(path, context.allowed_paths, option, write=writable)
        try:
            return ShmGuestMemory(
                fd, path, below_4g=below_4g, use_map=use_map, writable=writable, option=option
            )
        except BaseException:
            os.close(fd)
            raise
