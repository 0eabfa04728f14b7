"""pagefusion's Python client library, CLI and test harness.

``PageFusionClient`` and ``PageFusionError`` are importable from here; they
load gRPC and the generated code on first use, so that importing the test
harness (a pytest plugin) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagefusion.clients.client import PageFusionClient
    from pagefusion.clients.errors import PageFusionError

__all__ = ["PageFusionClient", "PageFusionError"]


def __getattr__(name: str) -> Any:
    if name == "PageFusionClient":
        from pagefusion.clients.client import PageFusionClient

        return PageFusionClient
    if name == "PageFusionError":
        from pagefusion.clients.errors import PageFusionError

        return PageFusionError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
