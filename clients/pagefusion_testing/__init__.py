"""``pagefusion.testing``: the test harness under the name DESIGN.md gives it.

The code lives in :mod:`pagefusion.clients.testing` (also the pytest plugin);
this package only re-exports it. pyproject maps this folder to
``pagefusion.testing``.
"""

from pagefusion.clients.testing import (
    RunningServer,
    ServerStartError,
    TlsFiles,
    make_tls_files,
    run_server,
)

__all__ = ["RunningServer", "ServerStartError", "TlsFiles", "make_tls_files", "run_server"]
