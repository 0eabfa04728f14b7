"""``pagefusion.testing``: the test harness under the name DESIGN.md gives it.

The code lives in :mod:`pagefusion.clients.testing` (also the pytest plugin)
and :mod:`pagefusion.clients.snapshot_writers` (memory snapshot files in the
formats the ``file`` adapter reads); this package only re-exports them.
pyproject maps this folder to ``pagefusion.testing``.
"""

from pagefusion.clients.snapshot_writers import (
    unflatten_kdump,
    write_kdump,
    write_libvirt_save,
    write_lime,
    write_qemu_stream,
    write_windows_dump,
)
from pagefusion.clients.testing import (
    RunningServer,
    ServerStartError,
    TlsFiles,
    make_tls_files,
    run_server,
)

__all__ = [
    "RunningServer",
    "ServerStartError",
    "TlsFiles",
    "make_tls_files",
    "run_server",
    "unflatten_kdump",
    "write_kdump",
    "write_libvirt_save",
    "write_lime",
    "write_qemu_stream",
    "write_windows_dump",
]
