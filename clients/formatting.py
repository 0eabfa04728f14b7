"""Text output of the CLI, in the shapes VBoxManage prints.

Pure functions from ``pagefusion.v1`` messages to strings (no I/O), so the
exact layouts can be unit-tested with fixed messages:

- ``metrics query``: header, dashed rule, then per object and metric the
  object left-justified in 15 columns, the metric in 40, then the values
  oldest first joined by ``", "`` (``524288 kB`` for scale 1, otherwise
  value/scale with two decimals and the unit with no space: ``12.34%``).
- ``metrics list``: Object, Metric, Unit, Minimum, Maximum, Period, Count,
  Description.
- ``metrics collect``: ``HH:MM:SS.mmm`` timestamped rows.
- ``showvminfo``: ``Key:`` padded to 28 columns, then the value.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from pagefusion.clients.resources import MEBIBYTE, format_source, machine_id_of

PAGE_SIZE = 4096

# -- metrics ------------------------------------------------------------------

QUERY_HEADER = f"{'Object':<15} {'Metric':<40} Values"
QUERY_RULE = f"{'-' * 15} {'-' * 40} {'-' * 44}"
LIST_HEADER = (
    f"{'Object':<15} {'Metric':<40} {'Unit':<4} {'Minimum':>10} {'Maximum':>10} "
    f"{'Period':>10} {'Count':>10} Description"
)
LIST_RULE = (
    f"{'-' * 15} {'-' * 40} {'-' * 4} {'-' * 10} {'-' * 10} {'-' * 10} {'-' * 10} {'-' * 11}"
)
COLLECT_HEADER = f"{'Time stamp':<12} {'Object':<10} {'Metric':<20} Value"
COLLECT_RULE = f"{'-' * 12} {'-' * 10} {'-' * 20} {'-' * 20}"
AFFECTED_HEADER = f"{'Object':<10} Metric"
AFFECTED_RULE = f"{'-' * 10} {'-' * 20}"


def _c_div(a: int, b: int) -> int:
    """Integer division truncating toward zero, as C does."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def format_metric_value(value: int, scale: int, unit: str) -> str:
    """One sample as VBoxManage prints it: ``524288 kB`` or ``12.34%``.

    With a scale other than 1 the value is ``value/scale`` with two decimals
    computed in integer arithmetic (truncated, like VBoxManage's
    ``%d.%02d``), and the unit follows with no space.
    """
    if scale in (0, 1):
        return f"{value} {unit}"
    whole = _c_div(value, scale)
    hundredths = _c_div(value * 100, scale)
    hundredths -= _c_div(hundredths, 100) * 100  # C's % keeps the dividend's sign
    return f"{whole}.{hundredths:02d}{unit}"


def format_metric_values(values: Iterable[int], scale: int, unit: str) -> str:
    """Samples oldest first, joined by ``", "``."""
    return ", ".join(format_metric_value(v, scale, unit) for v in values)


def format_metrics_query(data: Iterable[Any]) -> str:
    """The ``metrics query`` table of a ``QueryMetricsResponse.data``."""
    lines = [QUERY_HEADER, QUERY_RULE]
    for item in data:
        values = format_metric_values(item.values, item.scale, item.unit)
        lines.append(f"{item.object:<15} {item.metric:<40} {values}")
    return "\n".join(lines) + "\n"


def format_metrics_list(metrics: Iterable[Any]) -> str:
    """The ``metrics list`` table of ``Metric`` descriptions."""
    lines = [LIST_HEADER, LIST_RULE]
    for m in metrics:
        lines.append(
            f"{m.object:<15} {m.metric:<40} {m.unit:<4} {m.minimum:>10} {m.maximum:>10} "
            f"{m.period_seconds:>10} {m.sample_count:>10} {m.description}"
        )
    return "\n".join(lines) + "\n"


def format_affected_metrics(metrics: Sequence[Any]) -> str:
    """What ``metrics setup|enable|disable|collect --list`` prints."""
    lines = ["The following metrics were modified:", "", AFFECTED_HEADER, AFFECTED_RULE]
    lines += [f"{m.object:<10} {m.metric:<20}" for m in metrics]
    return "\n".join(lines) + "\n\n"


def collect_timestamp(now: dt.datetime | None = None) -> str:
    """``HH:MM:SS.mmm`` in local time, as ``metrics collect`` stamps rows."""
    now = now or dt.datetime.now()
    return now.strftime("%H:%M:%S.") + f"{now.microsecond // 1000:03d}"


def format_collect_rows(timestamp: str, data: Iterable[Any]) -> str:
    """One ``metrics collect`` round: a row per object and metric."""
    rows = []
    for item in data:
        values = format_metric_values(item.values, item.scale, item.unit)
        rows.append(f"{timestamp:<12} {item.object:<10} {item.metric:<20} {values}")
    return "".join(row + "\n" for row in rows)


# -- machines -----------------------------------------------------------------

_STATE_TEXT = {
    0: ("unknown", "unknown"),
    1: ("powered off", "poweroff"),
    2: ("starting", "starting"),
    3: ("running", "running"),
    4: ("stopping", "stopping"),
}


def state_text(state: int) -> str:
    """Human state as VBoxManage prints it (``powered off``, ``running``, ...)."""
    return _STATE_TEXT.get(int(state), ("unknown", "unknown"))[0]


def machine_label(machine: Any) -> str:
    """The name a person knows a machine by: its display name, else its id."""
    return str(machine.display_name or machine_id_of(machine.name))


def format_list_vms(machines: Iterable[Any]) -> str:
    """``list vms``: ``"display name" {machine-id}`` per machine, as VBoxManage."""
    return "".join(f'"{machine_label(m)}" {{{machine_id_of(m.name)}}}\n' for m in machines)


def memory_text(size_bytes: int) -> str:
    """``2048MB`` like VBoxManage; ``from source`` for 0; bytes if not whole MB."""
    if size_bytes == 0:
        return "from source"
    if size_bytes % MEBIBYTE == 0:
        return f"{size_bytes // MEBIBYTE}MB"
    return f"{size_bytes} bytes"


def size_text(size_bytes: int) -> str:
    """A byte count for people: ``1.50 GiB``, ``12.00 MiB``, ``4 KiB``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if size_bytes >= factor:
            return f"{size_bytes / factor:.2f} {unit}"
    return f"{size_bytes // 1024} KiB"


def _timestamp_text(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    moment = dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def machine_info_items(machine: Any, stats: Any | None = None) -> list[tuple[str, str]]:
    """``showvminfo`` as (key, value) pairs; ``stats`` is its MachineFusionStats if running."""
    source = machine.memory_source
    items = [
        ("Name", machine_label(machine)),
        ("ID", machine_id_of(machine.name)),
        ("Resource name", machine.name),
        ("Guest OS", machine.os_type or "unknown"),
        ("Memory size", memory_text(machine.memory_size_bytes)),
        ("Page Fusion", on_off(machine.page_fusion_enabled)),
        ("Fusion domain", machine.fusion_domain or "default"),
        ("Memory source", format_source(source.adapter, dict(source.options)) or "none"),
        ("State", state_text(machine.state)),
    ]
    created = _timestamp_text(machine.create_time)
    if created:
        items.append(("Created", created))
    if stats is not None:
        items += [
            ("Guest pages", f"{stats.guest_pages} ({size_text(stats.guest_pages * PAGE_SIZE)})"),
            ("Zero pages", str(stats.zero_pages)),
            ("Private pages", str(stats.private_pages)),
            ("Shared pages", str(stats.shared_pages)),
            ("Volatile pages", str(stats.volatile_pages)),
        ]
    return items


def format_key_values(items: Iterable[tuple[str, str]]) -> str:
    """``Key:`` left-justified in 28 columns, a space, then the value."""
    return "".join(f"{key + ':':<28} {value}\n" for key, value in items)


def format_machine_info(machine: Any, stats: Any | None = None) -> str:
    return format_key_values(machine_info_items(machine, stats))


def format_machine_readable(machine: Any) -> str:
    """``showvminfo --machinereadable``: ``key="value"`` lines as VBoxManage."""
    source = machine.memory_source
    pairs: list[tuple[str, str | int]] = [
        ("name", machine_label(machine)),
        ("id", machine_id_of(machine.name)),
        ("ostype", machine.os_type),
        ("memory", machine.memory_size_bytes // MEBIBYTE),
        ("memorybytes", machine.memory_size_bytes),
        ("pagefusion", on_off(machine.page_fusion_enabled)),
        ("fusiondomain", machine.fusion_domain or "default"),
        ("source", format_source(source.adapter, dict(source.options))),
        ("VMState", _STATE_TEXT.get(int(machine.state), ("unknown", "unknown"))[1]),
    ]
    lines = []
    for key, value in pairs:
        if isinstance(value, int):
            lines.append(f"{key}={value}")
        else:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key}="{escaped}"')
    return "\n".join(lines) + "\n"


# -- fusion -------------------------------------------------------------------

_MODE_TEXT = {0: "unspecified", 1: "hints", 2: "content", 3: "all"}


def format_fusion_config(config: Any) -> str:
    return format_key_values(
        [
            ("Mode", _MODE_TEXT.get(int(config.mode), str(config.mode))),
            ("Background scan", on_off(config.background_scan)),
            ("Pages per second", str(config.pages_per_second)),
            ("Stable scans before merge", str(config.stable_scans_before_merge)),
        ]
    )


def _pages(count: int) -> str:
    return f"{count} ({size_text(count * PAGE_SIZE)})"


def format_fusion_stats(stats: Any) -> str:
    """``fusion stats``: host counters, then one row per running machine."""
    host = stats.host
    saved_share = 100.0 * host.pages_saved / host.guest_pages if host.guest_pages else 0.0
    text = format_key_values(
        [
            ("Guest pages", _pages(host.guest_pages)),
            ("Zero pages", _pages(host.zero_pages)),
            ("Private pages", _pages(host.private_pages)),
            ("Shared pages", _pages(host.shared_pages)),
            ("Frames used", _pages(host.frames_used)),
            ("Frames shared", _pages(host.frames_shared)),
            ("Frames free", _pages(host.frames_free)),
            ("Pages saved", f"{_pages(host.pages_saved)}, {saved_share:.1f}% of guest pages"),
            ("Volatile pages", str(host.volatile_pages)),
            ("Full scans", str(host.full_scans)),
            ("Metadata", size_text(host.metadata_bytes)),
            ("Profit", f"{size_text(host.profit_bytes)} (saved + zero - metadata)"),
        ]
    )
    if stats.machines:
        header = (
            f"{'Machine':<24} {'Guest':>12} {'Zero':>12} {'Private':>12} "
            f"{'Shared':>12} {'Volatile':>12}"
        )
        rows = [header, f"{'-' * 24} " + " ".join(["-" * 12] * 5)]
        for m in stats.machines:
            rows.append(
                f"{machine_id_of(m.name):<24} {m.guest_pages:>12} {m.zero_pages:>12} "
                f"{m.private_pages:>12} {m.shared_pages:>12} {m.volatile_pages:>12}"
            )
        text += "\n" + "\n".join(rows) + "\n"
    return text


def format_scan(result: Any) -> str:
    return format_key_values(
        [
            ("Pages scanned", str(result.pages_scanned)),
            ("Pages fused", str(result.pages_fused)),
            ("Pages copied on write", str(result.pages_copied_on_write)),
        ]
    )


def format_verify(result: Any) -> str:
    """``fusion verify``: the verdict, what was checked, then each problem."""
    text = format_key_values(
        [
            ("Consistent", "yes" if result.consistent else "no"),
            ("Pages checked", str(result.pages_checked)),
            ("Frames checked", str(result.frames_checked)),
            ("Problems", str(len(result.problems))),
        ]
    )
    return text + "".join(f"  {problem}\n" for problem in result.problems)
