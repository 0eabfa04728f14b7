"""The adapter gateway: the one place adapters are found, checked and opened.

Adapters are discovered through the entry-point group ``pagefusion.adapters``;
the built-in ones register through the same group in pyproject.toml. A
plugin that fails to import or to instantiate is logged, naming its entry
point, and skipped: one broken plugin never stops the server (pluggy's rule),
and a machine that names it is refused with the cause of the failure.

:class:`AdapterGateway` owns everything between a ``memory_source`` and a
usable :class:`GuestMemory`: lookup (an unknown or failed adapter), option
checks (names, then the adapter's own value checks), opening (exceptions an
adapter lets escape become AdapterErrors, never tracebacks), range
validation, and closing what failed. The server checks a source with
:meth:`AdapterGateway.check` when a machine is defined and opens it with
:meth:`AdapterGateway.open` when it starts; the engine trusts what it gets.
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
    open_allowed,
    resolve_allowed,
    validate_ranges,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "AdapterGateway",
    "load_adapters",
    "load_failures",
    "open_allowed",
    "open_source",
    "resolve_allowed",
]

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
#: Entry point name -> why it failed to load, from the latest discovery.
_FAILURES: dict[str, str] = {}
#: Longest name or option quoted in a message (as the server's error messages).
QUOTE_LIMIT = 128


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
    failures: dict[str, str] = {}
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
            failures[ep.name] = f"{type(exc).__name__}: {exc}"
            log.error("adapter_load_failed", entry_point=ep.name, value=ep.value,
                      error=failures[ep.name])
    for name, value in _BUILTINS.items():
        if name in attempted:
            continue
        module, _, attr = value.partition(":")
        try:
            adapters[name] = _instantiate(name, getattr(importlib.import_module(module), attr))
        except Exception as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
            log.error("adapter_load_failed", entry_point=name, value=value,
                      error=failures[name])
    _FAILURES.clear()
    _FAILURES.update({k: v for k, v in failures.items() if k not in adapters})
    return adapters


def load_failures() -> dict[str, str]:
    """Adapters the latest :func:`load_adapters` could not load, with the cause."""
    return dict(_FAILURES)


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``value`` as ``repr`` shows it, cut to ``limit`` characters with its length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class AdapterGateway:
    """Lookup, option checks, opening, range validation and load failures.

    Args:
        adapters: adapters by name; ``None`` discovers the installed ones.
        failures: adapters that failed to load, name -> cause; default: what
            the latest discovery found (:func:`load_failures`).
    """

    def __init__(
        self,
        adapters: Mapping[str, Adapter] | None = None,
        failures: Mapping[str, str] | None = None,
    ) -> None:
        self.adapters: dict[str, Adapter] = dict(load_adapters() if adapters is None else adapters)
        found = load_failures() if failures is None else failures
        self.failures = {k: v for k, v in found.items() if k not in self.adapters}

    def lookup(self, adapter_name: str) -> Adapter:
        """The adapter called ``adapter_name``.

        Raises:
            InvalidOptionError: (option ``adapter``) none given, unknown, or
                failed to load (with the cause).
        """
        if not adapter_name:
            raise InvalidOptionError("required", option="adapter")
        adapter = self.adapters.get(adapter_name)
        if adapter is not None:
            return adapter
        cause = self.failures.get(adapter_name)
        if cause is not None:
            raise InvalidOptionError(
                f"adapter {quote(adapter_name)} is installed but failed to load: {cause}",
                option="adapter",
            )
        known = ", ".join(sorted(self.adapters)) or "none"
        raise InvalidOptionError(
            f"unknown adapter {quote(adapter_name)} (known adapters: {known})", option="adapter"
        )

    def check(self, adapter_name: str, options: Mapping[str, str]) -> Adapter:
        """Check a memory source without opening it (a machine being defined).

        Raises:
            InvalidOptionError: unknown adapter or option, or a malformed value.
        """
        adapter = self.lookup(adapter_name)
        for key in options:
            if key not in adapter.options:
                accepted = ", ".join(sorted(adapter.options)) or "none"
                raise InvalidOptionError(
                    f"adapter {quote(adapter_name)} has no option {quote(key)} "
                    f"(accepted: {accepted})",
                    option=key,
                )
        try:
            adapter.check_options(options)
        except AdapterError:
            raise
        except Exception as exc:
            log.error("adapter_check_failed", adapter=adapter_name,
                      error=f"{type(exc).__name__}: {exc}")
            raise InvalidOptionError(
                f"adapter {quote(adapter_name)} could not check its options: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return adapter

    def open(
        self, adapter_name: str, options: Mapping[str, str], context: AdapterContext
    ) -> GuestMemory:
        """Check and open a machine's memory source, and check what came back.

        Raises:
            AdapterError: a subclass naming the cause (and the option, when one
                is at fault). Exceptions an adapter lets escape are wrapped so
                a user never sees a traceback; a source whose ranges break the
                interface's rules is closed and refused.
        """
        adapter = self.check(adapter_name, options)
        try:
            memory = adapter.open(options, context)
        except AdapterError:
            raise
        except FileNotFoundError as exc:
            raise SourceNotFoundError(f"adapter {adapter_name!r}: {exc}") from exc
        except PermissionError as exc:
            raise SourcePermissionError(f"adapter {adapter_name!r}: {exc}") from exc
        except Exception as exc:
            log.error("adapter_open_failed", adapter=adapter_name,
                      error=f"{type(exc).__name__}: {exc}")
            raise SourceError(
                f"adapter {adapter_name!r} failed to open the source: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            validate_ranges(memory.ranges(), f"adapter {adapter_name!r}")
        except BaseException:
            memory.close()
            raise
        return memory


def open_source(
    adapter_name: str,
    options: Mapping[str, str],
    context: AdapterContext,
    adapters: Mapping[str, Adapter] | None = None,
) -> GuestMemory:
    """Open a machine's memory source through an :class:`AdapterGateway`.

    Args:
        adapter_name: ``memory_source.adapter``.
        options: ``memory_source.options``.
        context: what the server knows about the machine.
        adapters: loaded adapters; ``None`` loads them now.

    Raises:
        AdapterError: see :meth:`AdapterGateway.open`.
    """
    return AdapterGateway(adapters).open(adapter_name, options, context)


