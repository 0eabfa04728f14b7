"""Resource names (AIP-122) and the small value parsers the CLI shares.

A machine's resource name is ``machines/{machine_id}``. Ids are lowercase
letters, digits and ``-``, 1 to 63 characters, starting with a letter. The
server is the authority on validity; the helpers here only shape names so
that the client and the CLI accept either form (``w10`` or ``machines/w10``).
"""

from __future__ import annotations

import re

MACHINE_COLLECTION = "machines"
MACHINE_ID_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MEBIBYTE = 1024 * 1024


def machine_name(machine_id: str) -> str:
    """Return the resource name of a machine: ``machines/{machine_id}``.

    A value that is already a machine resource name is returned unchanged.
    """
    if machine_id.startswith(MACHINE_COLLECTION + "/"):
        return machine_id
    return f"{MACHINE_COLLECTION}/{machine_id}"


def parse_machine_name(name: str) -> str:
    """Return the machine id of a resource name ``machines/{machine_id}``.

    Raises:
        ValueError: ``name`` is not a machine resource name.
    """
    collection, sep, machine_id = name.partition("/")
    if collection != MACHINE_COLLECTION or not sep or not machine_id or "/" in machine_id:
        raise ValueError(f"not a machine resource name: {name!r} (expected machines/{{id}})")
    return machine_id


def machine_id_of(name_or_id: str) -> str:
    """Return the machine id from either an id or a resource name."""
    if name_or_id.startswith(MACHINE_COLLECTION + "/"):
        return parse_machine_name(name_or_id)
    return name_or_id


def is_valid_machine_id(machine_id: str) -> bool:
    """Whether ``machine_id`` has the shape AIP-122 ids take here."""
    return MACHINE_ID_PATTERN.fullmatch(machine_id) is not None


def machine_id_from_display_name(display_name: str) -> str:
    """Derive a valid machine id from a free-form name such as ``"Windows 10"``.

    Lowercases, turns every run of other characters into ``-``, prefixes
    ``vm-`` when the result would not start with a letter, and cuts to 63
    characters.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", display_name.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"vm-{slug}".rstrip("-")
    return slug[:63].rstrip("-")


def parse_source(spec: str) -> tuple[str, dict[str, str]]:
    """Parse ``ADAPTER[:key=value,...]`` into an adapter name and its options.

    A piece without ``=`` continues the previous value, so values may hold
    commas (``file:path=/a,b.img`` gives ``{"path": "/a,b.img"}``).

    Raises:
        ValueError: no adapter name, or an option before the first ``key=``.
    """
    adapter, _, rest = spec.partition(":")
    adapter = adapter.strip()
    if not adapter:
        raise ValueError(f"--source {spec!r}: expected ADAPTER[:key=value,...]")
    options: dict[str, str] = {}
    last_key: str | None = None
    if rest:
        for piece in rest.split(","):
            key, eq, value = piece.partition("=")
            if eq and key.strip():
                last_key = key.strip()
                options[last_key] = value
            elif last_key is not None:
                options[last_key] += "," + piece
            else:
                raise ValueError(f"--source {spec!r}: option {piece!r} is not key=value")
    return adapter, options


def format_source(adapter: str, options: dict[str, str]) -> str:
    """The inverse of :func:`parse_source`, with options in key order."""
    if not options:
        return adapter
    return adapter + ":" + ",".join(f"{k}={options[k]}" for k in sorted(options))


def parse_on_off(value: str) -> bool:
    """Parse VBoxManage's ``on|off`` switches (also yes/no, true/false, 1/0)."""
    lowered = value.strip().lower()
    if lowered in ("on", "yes", "true", "1", "enabled"):
        return True
    if lowered in ("off", "no", "false", "0", "disabled"):
        return False
    raise ValueError(f"expected on or off, got {value!r}")


def parse_memory_mb(value: str) -> int:
    """Parse ``--memory`` (mebibytes, as VBoxManage) into bytes."""
    try:
        megabytes = int(value, 10)
    except ValueError:
        raise ValueError(f"--memory expects a whole number of MB, got {value!r}") from None
    if megabytes < 0:
        raise ValueError(f"--memory must not be negative, got {value!r}")
    return megabytes * MEBIBYTE
