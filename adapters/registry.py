"""Finding adapters and opening a machine's memory source through them.

Adapters are discovered through the entry-point group ``pagefusion.adapters``;
the built-in ones register through the same group in pyproject.toml. A
plugin that fails to import or to instantiate is logged, naming its entry
point, and skipped: one broken plugin never stops the server (pluggy's rule).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points

import structlog

from pagefusion.adapters.base import (
    Adapter,
    AdapterContext,
    AdapterError,
    GuestMemory,
    InvalidOptionError,
    SourceError,
    SourceNotFoundError,
    SourcePermissionError,
)
from pagefusion.adapters.helpers import (
    check_option_names,
    open_allowed,
    resolve_allowed,
    validate_ranges,
)

__all__ = ["ENTRY_POINT_GROUP", "load_adapters", "open_allowed", "open_source", "resolve_allowed"]

ENTRY_POINT_GROUP = "pagefusion.adapters"

# The built-ins, used only when the distribution's metadata is missing (a
# source tree on PYTHONPATH); an installed pagefusion finds them as entry points.
_BUILTINS = {
    "memory": "pagefusion.adapters.memory:MemoryAdapter",
    "file": "pagefusion.adapters.file:FileAdapter",
    "shm": "pagefusion.adapters.shm:ShmAdapter",
    "synthetic-windows": "pagefusion.adapters.synthetic_windows:SyntheticWindowsAdapter",
}

log = structlog.get_logger(__name__)


def _instantiate(name: str, target: object) -> Adapter:
    adapter = target() if isinstance(target, type) else target
    if not isinstance(adapter, Adapter):
        raise TypeError(f"{type(adapter).__name__} is not a pagefusion.adapters.base.Adapter")
    if adapter.name and adapter.name != name:
        log.warning("adapter name differs from its entry point; using the entry point's",
                    entry_point=name, adapter_name=adapter.name)
    return adapter


def load_adapters() -> dict[str, Adapter]:
    """Load every adapter registered under ``pagefusion.adapters``.

    Returns:
        Adapter instances keyed by entry-point name. Never raises: a plugin
        that fails is logged (``adapter_load_failed``) and left out.
    """
    adapters: dict[str, Adapter] = {}
    try:
        found: list[EntryPoint] = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # broken metadata of some unrelated distribution
        log.error("adapter_discovery_failed", group=ENTRY_POINT_GROUP, error=str(exc))
        found = []
    attempted = {ep.name for ep in found}
    for ep in found:
        if ep.name in adapters:
            log.warning("adapter_duplicate_skipped", entry_point=ep.name, value=ep.value)
            continue
        try:
            adapters[ep.name] = _instantiate(ep.name, ep.load())
        except Exception as exc:
            log.error("adapter_load_failed", entry_point=ep.name, value=ep.value,
                      error=f"{type(exc).__name__}: {exc}")
    for name, value in _BUILTINS.items():
        if name in attempted:
            continue
        module, _, attr = value.partition(":")
        try:
            adapters[name] = _instantiate(name, getattr(importlib.import_module(module), attr))
        except Exception as exc:
            log.error("adapter_load_failed", entry_point=name, value=value,
                      error=f"{type(exc).__name__}: {exc}")
    return adapters


def open_source(
    adapter_name: str,
    options: Mapping[str, str],
    context: AdapterContext,
    adapters: Mapping[str, Adapter] | None = None,
) -> GuestMemory:
    """Open a machine's memory source and check what the adapter returned.

    Args:
        adapter_name: ``memory_source.adapter``.
        options: ``memory_source.options``.
        context: what the server knows about the machine.
        adapters: loaded adapters; ``None`` loads them now.

    Raises:
        AdapterError: a subclass naming the cause (and the option, when one
            is at fault). Exceptions other adapters let escape are wrapped so
            a user never sees a traceback.
    """
    if adapters is None:
        adapters = load_adapters()
    adapter = adapters.get(adapter_name)
    if adapter is None:
        known = ", ".join(sorted(adapters)) or "none"
        raise InvalidOptionError(
            f"unknown adapter {adapter_name!r} (known adapters: {known})", option="adapter"
        )
    check_option_names(options, adapter.options, adapter_name)
    try:
        memory = adapter.open(options, context)
    except AdapterError:
        raise
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"adapter {adapter_name!r}: {exc}") from exc
    except PermissionError as exc:
        raise SourcePermissionError(f"adapter {adapter_name!r}: {exc}") from exc
    except Exception as exc:
        log.error("adapter_open_failed", adapter=adapter_name, error=f"{type(exc).__name__}: {exc}")
        raise SourceError(
            f"adapter {adapter_name!r} failed to open the source: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        validate_ranges(memory.ranges(), f"adapter {adapter_name!r}")
    except BaseException:
        memory.close()
        raise
    return memory
