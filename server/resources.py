"""Resource names (AIP-122): ``machines/{machine_id}``."""

from __future__ import annotations

import re

from pagefusion.server.errors import current_resource, invalid_argument, quote

MACHINE_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
#: Ids CreateMachine refuses: they name other objects (`host` in metrics).
RESERVED_IDS = frozenset({"host"})
COLLECTION = "machines"
MACHINE_TYPE = "pagefusion.dev/Machine"
_ID_RULE = "lowercase letters, digits and '-', 1 to 63 characters, starting with a letter"


def machine_name(machine_id: str) -> str:
    return f"{COLLECTION}/{machine_id}"


def check_machine_id(machine_id: str, field: str = "machine_id") -> str:
    """Return ``machine_id`` if valid, else raise INVALID_ARGUMENT naming ``field``."""
    if not MACHINE_ID_RE.fullmatch(machine_id):
        raise invalid_argument(field, f"invalid machine id {quote(machine_id)}: {_ID_RULE}")
    return machine_id


def parse_machine_name(name: str, field: str = "name") -> str:
    """The machine id in ``machines/{machine_id}``; INVALID_ARGUMENT naming ``field`` otherwise.

    Also records the name as the resource the current RPC is about, so
    errors raised later in the call can name it.
    """
    prefix = f"{COLLECTION}/"
    if not name.startswith(prefix):
        raise invalid_argument(
            field, f"invalid machine name {quote(name)}: expected 'machines/{{machine_id}}'"
        )
    machine_id = check_machine_id(name[len(prefix) :], field)
    current_resource.set(name)
    return machine_id
