"""The ``pagefusion`` command, modelled on VBoxManage.

Verbs::

    createvm --name N [--id ID] [--memory MB] [--ostype T] [--source ADAPTER[:k=v,...]]
             [--page-fusion on|off] [--fusion-domain D] [--register]
    modifyvm NAME [--name N] [--memory MB] [--ostype T] [--source ...]
             [--page-fusion on|off] [--fusion-domain D]
    startvm NAME...            controlvm NAME poweroff      unregistervm NAME [--delete]
    list [--long] vms|runningvms                            showvminfo NAME [--machinereadable]
    fusion stats | fusion scan [NAME...] | fusion config [--mode M] [--background-scan on|off]
                                                         [--pages-per-second N] [--stable-scans N]
    fusion verify              (exit 1 when the recount finds a problem)
    metrics list|query|enable|disable [--list] [OBJECT [METRIC,...]]
    metrics setup|collect [--period S] [--samples N] [--list] [--detach] [OBJECT [METRIC,...]]
    guest-agent NAME [--interval SECONDS] [--once]
    estimate [--plot FILE] [--scheduler ADDRESS] [--hosts N --host-memory BYTES] SPEC...

The server comes from ``--server HOST:PORT``, else ``$PAGEFUSION_SERVER``,
else 127.0.0.1:50051. A server started with ``--auth-token-file`` wants a
token: ``--token-file FILE``, else ``--token TOKEN`` (visible to other users
in ``ps``), else ``$PAGEFUSION_TOKEN``. A TLS server wants ``--tls-ca FILE``
(or ``$PAGEFUSION_TLS_CA``; ``--tls`` alone trusts the system's roots), and
one started with ``--tls-client-ca`` also ``--tls-cert FILE --tls-key FILE``.
A machine NAME is its id, its resource name (``machines/ID``) or its display
name. Any failure exits non-zero with one line on stderr
(``pagefusion: error: NOT_FOUND: ...``); usage errors exit 2.
``--json`` prints the responses as JSON (protobuf's JSON mapping, field
names as in the protos) for scripts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, NoReturn

PROG = "pagefusion"
SERVER_ENV = "PAGEFUSION_SERVER"
TOKEN_ENV = "PAGEFUSION_TOKEN"
TLS_CA_ENV = "PAGEFUSION_TLS_CA"
DEFAULT_SERVER = "127.0.0.1:50051"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command line; exits 2 with one line on stderr."""

    def __init__(self, message: str, *, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog


class _Stop(Exception):
    """SIGTERM or SIGINT asked a long-running verb to stop."""


class _NoMetrics(Exception):
    """``--list`` found no metric to list (VBoxManage reports this as an error)."""


# -- argument parsing -----------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``pagefusion: error: ...``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, prog=self.prog)


def _on_off(value: str) -> bool:
    from pagefusion.clients.resources import parse_on_off

    try:
        return parse_on_off(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value!r}")
    return number


def _memory(value: str) -> int:
    from pagefusion.clients.resources import parse_memory_mb

    try:
        return parse_memory_mb(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _source(value: str) -> tuple[str, dict[str, str]]:
    from pagefusion.clients.resources import parse_source

    try:
        return parse_source(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--server/--json/--timeout and the security flags, accepted before or after the verb."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default(None),
        help=f"server address (default: ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON for scripts"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=default(30.0),
        help="deadline of each call (default 30; startvm/controlvm/scans wait as long as needed)",
    )
    parser.add_argument(
        "--token", metavar="TOKEN", default=default(None),
        help=f"bearer token for the server's --auth-token-file (default: ${TOKEN_ENV}); "
             "prefer --token-file or the variable: arguments show in ps",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", default=default(None),
        help="read the bearer token from the first line of FILE",
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False),
        help="connect with TLS, trusting the system's roots (implied by --tls-ca)",
    )
    parser.add_argument(
        "--tls-ca", metavar="FILE", default=default(None),
        help=f"connect with TLS, trusting the CA certificates in FILE (default: ${TLS_CA_ENV})",
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", default=default(None),
        help="client certificate (PEM) for a server started with --tls-client-ca",
    )
    parser.add_argument(
        "--tls-key", metavar="FILE", default=default(None), help="the key of --tls-cert (PEM)"
    )
    parser.add_argument(
        "--tls-server-name", metavar="NAME", default=default(None),
        help="the name the server's certificate must carry, if not the --server host",
    )


def _machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory", type=_memory, metavar="MB", help="guest memory in MB (0: size of the source)"
    )
    parser.add_argument(
        "--ostype", "--os-type", dest="ostype", metavar="TYPE", help="e.g. Windows10_64, Linux_64"
    )
    parser.add_argument(
        "--source",
        type=_source,
        metavar="ADAPTER[:KEY=VALUE,...]",
        help="memory source, e.g. file:path=/images/w10.core or synthetic-windows:seed=7",
    )
    parser.add_argument(
        "--page-fusion",
        "--pagefusion",
        dest="page_fusion",
        type=_on_off,
        metavar="on|off",
        help="share identical non-zero pages with other machines (only while powered off)",
    )
    parser.add_argument(
        "--fusion-domain",
        metavar="DOMAIN",
        help="pages are shared only within one fusion domain (default: default)",
    )


def _metrics_filter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "object", nargs="?", default="*", metavar="OBJECT", help="*, host or a machine"
    )
    parser.add_argument(
        "metrics",
        nargs="?",
        default="*",
        metavar="METRICS",
        help="comma-separated metric names or patterns (*, :avg, :min, :max)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pagefusion")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (exposed for tests and documentation)."""
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)

    parser = _Parser(
        prog=PROG,
        description="Drive a pagefusion server, VBoxManage style.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    def verb(name: str, help_text: str, handler: Callable[..., int]) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, parents=[common], description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    p = verb("createvm", "define a new machine (powered off)", cmd_createvm)
    p.add_argument("--name", required=True, help="display name (and id, if it is a valid id)")
    p.add_argument("--id", dest="machine_id", help="machine id (default: derived from --name)")
    _machine_options(p)
    p.add_argument("--register", action="store_true", help="accepted; machines always register")
    p.add_argument("--basefolder", help=argparse.SUPPRESS)

    p = verb("modifyvm", "change a machine's settings", cmd_modifyvm)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--name", dest="new_name", metavar="DISPLAY_NAME", help="new display name")
    _machine_options(p)

    p = verb("startvm", "load and fuse a machine's memory", cmd_startvm)
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--type", choices=["gui", "headless", "sdl", "separate"], help=argparse.SUPPRESS)

    p = verb("controlvm", "power a running machine off", cmd_controlvm)
    p.add_argument("name", metavar="NAME")
    p.add_argument("action", choices=["poweroff"], metavar="poweroff")

    p = verb("unregistervm", "delete a powered-off machine's definition", cmd_unregistervm)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--delete", action="store_true", help="accepted; sources are never deleted")

    p = verb("list", "list machines", cmd_list)
    p.add_argument("--long", "-l", action="store_true", help="full details of each machine")
    p.add_argument("what", choices=["vms", "runningvms"], metavar="vms|runningvms")

    p = verb("showvminfo", "show a machine's settings and state", cmd_showvminfo)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--machinereadable", action="store_true", help='key="value" lines')
    p.add_argument("--details", action="store_true", help=argparse.SUPPRESS)

    p = verb("fusion", "fusion statistics, scans and configuration", _missing_subcommand)
    fusion = p.add_subparsers(
        dest="fusion_verb", metavar="stats|scan|verify|config", parser_class=_Parser
    )
    fusion.required = True
    sub = fusion.add_parser("stats", parents=[common], help="host-wide and per-machine accounting")
    sub.set_defaults(handler=cmd_fusion_stats)
    sub = fusion.add_parser("scan", parents=[common], help="re-read live sources and fuse")
    sub.add_argument("names", nargs="*", metavar="NAME", help="machines (default: all running)")
    sub.set_defaults(handler=cmd_fusion_scan)
    sub = fusion.add_parser(
        "verify", parents=[common], help="recount sharing and accounting (exit 1 if inconsistent)"
    )
    sub.set_defaults(handler=cmd_fusion_verify)
    sub = fusion.add_parser("config", parents=[common], help="show or change fusion settings")
    sub.add_argument("--mode", choices=["hints", "content", "all"])
    sub.add_argument("--background-scan", type=_on_off, metavar="on|off")
    sub.add_argument("--pages-per-second", type=_non_negative, metavar="N")
    sub.add_argument("--stable-scans", type=_non_negative, metavar="N")
    sub.set_defaults(handler=cmd_fusion_config)

    p = verb("metrics", "VirtualBox's performance metrics", _missing_subcommand)
    metrics = p.add_subparsers(
        dest="metrics_verb", metavar="list|setup|query|enable|disable|collect", parser_class=_Parser
    )
    metrics.required = True
    for name, help_text, handler in (
        ("list", "describe metrics", cmd_metrics_list),
        ("query", "print buffered samples", cmd_metrics_query),
        ("enable", "resume collection (keeps samples)", cmd_metrics_enable),
        ("disable", "pause collection (keeps samples)", cmd_metrics_disable),
        ("setup", "set period and samples (discards samples)", cmd_metrics_setup),
        ("collect", "set up, then print samples continuously", cmd_metrics_collect),
    ):
        sub = metrics.add_parser(name, parents=[common], help=help_text)
        sub.set_defaults(handler=handler)
        if name in ("setup", "collect"):
            sub.add_argument("--period", type=_non_negative, default=1, metavar="SECONDS")
            sub.add_argument("--samples", type=_non_negative, default=1, metavar="COUNT")
        if name != "list" and name != "query":
            sub.add_argument("--list", action="store_true", help="list the metrics affected")
        if name == "collect":
            sub.add_argument(
                "--detach", action="store_true", help="set up and return; the server keeps sampling"
            )
        _metrics_filter(sub)

    p = verb("guest-agent", "register a machine's modules and ask for checks", cmd_guest_agent)
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--interval", type=_positive_float, default=60.0, metavar="SECONDS", help="default 60"
    )
    p.add_argument("--once", action="store_true", help="run one cycle and exit")
    _estimate_verb(verb("estimate", "what page fusion would save, offline", cmd_estimate))
    return parser


def _estimate_verb(p: argparse.ArgumentParser) -> None:
    """``estimate``: reads sources here (or on a Dask cluster); needs no server."""
    p.set_defaults(offline=True)
    p.add_argument("specs", nargs="+", metavar="SPEC",
                   help="JSON file: a list of CreateMachineRequest objects")
    p.add_argument("--plot", metavar="FILE", help="draw the pairwise sharing as a heatmap PNG")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="read and hash on a Dask cluster, e.g. tcp://HOST:8786 (extra: fleet)")
    p.add_argument("--hosts", type=_non_negative, metavar="N", help="place machines on N hosts")
    def size(value: str) -> int:
        from pagefusion.adapters.base import AdapterError
        from pagefusion.adapters.helpers import parse_size

        try:
            return parse_size({"size": value}, "size")
        except AdapterError:
            raise argparse.ArgumentTypeError(f"not a size in bytes: {value!r}") from None

    p.add_argument("--host-memory", type=size, metavar="BYTES",
                   help="memory of each host (with --hosts)")


def cmd_estimate(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients.estimate import run_cli

    return run_cli(args, out.as_json, _error_line, out.stream)


# -- output -------------------------------------------------------------------------


class Output:
    """Where a verb's results go: text for people or JSON for scripts."""

    def __init__(self, *, as_json: bool, stream: IO[str] | None = None) -> None:
        self.as_json = as_json
        self.stream = stream if stream is not None else sys.stdout

    def text(self, text: str) -> None:
        if not self.as_json:
            self.stream.write(text)
            self.stream.flush()

    def json(self, value: Any) -> None:
        if self.as_json:
            self.stream.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
            self.stream.flush()

    def json_line(self, value: Any) -> None:
        if self.as_json:
            self.stream.write(json.dumps(value, separators=(",", ":")) + "\n")
            self.stream.flush()


def to_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as JSON-ready dict (field names as in the protos)."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _message_line(kind: str, message: str) -> None:
    sys.stderr.write(f"{PROG}: {kind}: {' '.join(message.split())}\n")
    sys.stderr.flush()


def _error_line(message: str) -> None:
    _message_line("error", message)


# -- machine names ------------------------------------------------------------------


def resolve_machine(client: Any, name: str) -> str:
    """Turn NAME (id, resource name or display name) into a resource name."""
    from pagefusion.clients.errors import PageFusionError
    from pagefusion.clients.resources import is_valid_machine_id, machine_name

    if name.startswith("machines/") or is_valid_machine_id(name):
        return machine_name(name)
    import grpc

    matches = [m.name for m in client.list_machines() if m.display_name == name]
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise PageFusionError(grpc.StatusCode.NOT_FOUND, f'machine "{name}" not found')
    raise PageFusionError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f'display name "{name}" is ambiguous ({", ".join(matches)}); use the machine id',
    )


# -- verbs: machines ----------------------------------------------------------------


def _machine_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "memory_size_bytes": args.memory,
        "os_type": args.ostype,
        "page_fusion_enabled": args.page_fusion,
        "fusion_domain": args.fusion_domain,
        "memory_source": args.source,
    }
    return {key: value for key, value in fields.items() if value is not None}


def cmd_createvm(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients.resources import is_valid_machine_id, machine_id_from_display_name

    if args.machine_id:
        machine_id = args.machine_id
    elif is_valid_machine_id(args.name):
        machine_id = args.name
    else:
        machine_id = machine_id_from_display_name(args.name)
    machine = client.create_machine(machine_id, display_name=args.name, **_machine_fields(args))
    out.json(to_dict(machine))
    out.text(
        f"Virtual machine '{args.name}' is created and registered.\n"
        f"ID: {machine_id}\n"
        f"Resource name: {machine.name}\n"
    )
    return EXIT_OK


def cmd_modifyvm(client: Any, args: argparse.Namespace, out: Output) -> int:
    fields = _machine_fields(args)
    if args.new_name is not None:
        fields["display_name"] = args.new_name
    if not fields:
        raise UsageError("modifyvm: nothing to change; give at least one option")
    name = resolve_machine(client, args.name)
    machine = client.update_machine(name, **fields)
    out.json(to_dict(machine))
    return EXIT_OK


def cmd_startvm(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients.progress import progress_for, start_with_progress

    results = []
    for raw in args.names:
        name = resolve_machine(client, raw)
        if out.as_json:
            machine = client.start_machine(name)
        else:
            # As VBoxManage: the wait, its progress (a bar on a terminal,
            # 0%...10%... otherwise, from GetMachine's load_progress), the outcome.
            out.text(f'Waiting for VM "{raw}" to power on...\n')
            machine = start_with_progress(client, name, progress_for(out.stream))
        results.append(machine)
        out.text(f'VM "{raw}" has been successfully started.\n')
    if out.as_json:
        out.json(to_dict(results[0]) if len(results) == 1 else [to_dict(m) for m in results])
    return EXIT_OK


def cmd_controlvm(client: Any, args: argparse.Namespace, out: Output) -> int:
    name = resolve_machine(client, args.name)
    machine = client.stop_machine(name)
    out.json(to_dict(machine))
    return EXIT_OK


def cmd_unregistervm(client: Any, args: argparse.Namespace, out: Output) -> int:
    name = resolve_machine(client, args.name)
    client.delete_machine(name)
    out.json({})
    return EXIT_OK


def _running_stats(client: Any) -> dict[str, Any]:
    return {m.name: m for m in client.get_fusion_stats().machines}


def cmd_list(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients import formatting

    running = 3  # Machine.STATE_RUNNING; avoids importing the protos for one constant
    machines = list(client.list_machines())
    if args.what == "runningvms":
        machines = [m for m in machines if m.state == running]
    out.json({"machines": [to_dict(m) for m in machines]})
    if not args.long:
        out.text(formatting.format_list_vms(machines))
        return EXIT_OK
    stats = _running_stats(client) if any(m.state == running for m in machines) else {}
    out.text("\n".join(formatting.format_machine_info(m, stats.get(m.name)) for m in machines))
    return EXIT_OK


def cmd_showvminfo(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients import formatting

    machine = client.get_machine(resolve_machine(client, args.name))
    out.json(to_dict(machine))
    if args.machinereadable:
        out.text(formatting.format_machine_readable(machine))
        return EXIT_OK
    stats = _running_stats(client).get(machine.name) if machine.state == 3 else None
    out.text(formatting.format_machine_info(machine, stats))
    return EXIT_OK


# -- verbs: fusion ------------------------------------------------------------------


def _missing_subcommand(client: Any, args: argparse.Namespace, out: Output) -> int:
    raise UsageError(f"{args.verb}: missing sub-command")  # pragma: no cover (required=True)


def cmd_fusion_stats(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients import formatting

    stats = client.get_fusion_stats()
    out.json(to_dict(stats))
    out.text(formatting.format_fusion_stats(stats))
    return EXIT_OK


def cmd_fusion_scan(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients import formatting

    names = [resolve_machine(client, n) for n in args.names]
    if out.as_json or not out.stream.isatty():
        result = client.run_scan(names)  # output for scripts stays the result alone
    else:
        from pagefusion.clients.progress import Spinner
        from pagefusion.clients.resources import machine_id_of

        ids = [machine_id_of(n) for n in names]
        which = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        which = which or "every running machine"
        with Spinner(out.stream, f"Scanning the live memory of {which}..."):
            result = client.run_scan(names)
    out.json(to_dict(result))
    out.text(formatting.format_scan(result))
    return EXIT_OK


def cmd_fusion_verify(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients import formatting

    result = client.verify_fusion()
    out.json(to_dict(result))
    out.text(formatting.format_verify(result))
    return EXIT_OK if result.consistent else EXIT_FAILURE


def cmd_fusion_config(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients import formatting

    changes = {
        "mode": args.mode,
        "background_scan": args.background_scan,
        "pages_per_second": args.pages_per_second,
        "stable_scans_before_merge": args.stable_scans,
    }
    changes = {key: value for key, value in changes.items() if value is not None}
    config = client.update_fusion_config(**changes) if changes else client.get_fusion_config()
    out.json(to_dict(config))
    out.text(formatting.format_fusion_config(config))
    return EXIT_OK


# -- verbs: metrics -----------------------------------------------------------------


def metrics_filter(client: Any, obj: str, metrics: str) -> tuple[list[str], list[str]]:
    """VBoxManage's ``[*|host|VM [METRIC,...]]`` as (metric_names, objects) lists."""
    from pagefusion.clients.resources import machine_id_of

    names = [] if metrics.strip() in ("", "*") else [m.strip() for m in metrics.split(",") if m]
    if obj in ("", "*"):
        objects: list[str] = []
    elif obj == "host":
        objects = ["host"]
    else:
        objects = [machine_id_of(resolve_machine(client, obj))]
    return names, objects


def cmd_metrics_list(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients import formatting

    metrics = client.list_metrics(*metrics_filter(client, args.object, args.metrics))
    out.json({"metrics": [to_dict(m) for m in metrics]})
    out.text(formatting.format_metrics_list(metrics))
    return EXIT_OK


def cmd_metrics_query(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients import formatting

    response = client.query_metrics(*metrics_filter(client, args.object, args.metrics))
    out.json(to_dict(response))
    out.text(formatting.format_metrics_query(response.data))
    return EXIT_OK


def _affected(out: Output, args: argparse.Namespace, metrics: Sequence[Any]) -> int:
    from pagefusion.clients import formatting

    out.json({"metrics": [to_dict(m) for m in metrics]})
    if args.list:
        if not metrics:
            raise _NoMetrics()
        out.text(formatting.format_affected_metrics(metrics))
    return EXIT_OK


def cmd_metrics_setup(client: Any, args: argparse.Namespace, out: Output) -> int:
    names, objects = metrics_filter(client, args.object, args.metrics)
    affected = client.setup_metrics(
        names, objects, period_seconds=args.period, sample_count=args.samples
    )
    return _affected(out, args, affected)


def cmd_metrics_enable(client: Any, args: argparse.Namespace, out: Output) -> int:
    return _affected(
        out, args, client.enable_metrics(*metrics_filter(client, args.object, args.metrics))
    )


def cmd_metrics_disable(client: Any, args: argparse.Namespace, out: Output) -> int:
    names, objects = metrics_filter(client, args.object, args.metrics)
    return _affected(out, args, client.disable_metrics(names, objects))


def _poll_metrics(
    client: Any, names: list[str], objects: list[str], period: float
) -> Iterator[Any]:
    """WatchMetrics' fallback for servers without it: query every period."""
    while True:
        time.sleep(period)
        yield client.query_metrics(names, objects)


def cmd_metrics_collect(client: Any, args: argparse.Namespace, out: Output) -> int:
    import grpc

    from pagefusion.clients import formatting
    from pagefusion.clients.errors import PageFusionError

    names, objects = metrics_filter(client, args.object, args.metrics)
    affected = client.setup_metrics(
        names, objects, period_seconds=args.period, sample_count=args.samples
    )
    if args.list:
        if not affected:
            raise _NoMetrics()
        out.text(formatting.format_affected_metrics(affected))
    if args.detach:
        out.json({"metrics": [to_dict(m) for m in affected]})
        return EXIT_OK
    out.text(formatting.COLLECT_HEADER + "\n")
    stream: Iterator[Any] = client.watch_metrics(names, objects)
    with _stop_on_signals():
        try:
            try:
                first = next(stream)
            except PageFusionError as error:
                if error.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                stream = _poll_metrics(client, names, objects, max(args.period, 1))
                first = next(stream)
            for response in itertools.chain([first], stream):
                stamp = formatting.collect_timestamp()
                out.json_line({"timestamp": stamp, **to_dict(response)})
                out.text(
                    formatting.COLLECT_RULE
                    + "\n"
                    + formatting.format_collect_rows(stamp, response.data)
                )
        except (_Stop, StopIteration):
            pass
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    return EXIT_OK


# -- verbs: guest agent -------------------------------------------------------------


def cmd_guest_agent(client: Any, args: argparse.Namespace, out: Output) -> int:
    from pagefusion.clients.guest_agent import GuestAgent

    name = resolve_machine(client, args.name)
    # Progress of registering and checking, on a terminal only (the log lines stay as they are).
    terminal = out.stream if not out.as_json and out.stream.isatty() else None
    if args.once:
        report = GuestAgent(client, name, log=out, terminal=terminal).run_cycle()
        if report.errors:
            more = len(report.errors) - 1
            _error_line(report.errors[0] + (f" (and {more} more errors)" if more else ""))
            return EXIT_FAILURE
        return EXIT_OK
    agent = GuestAgent(
        client, name, log=out, warn=lambda text: _message_line("warning", text), terminal=terminal
    )
    stop = threading.Event()
    with _stop_on_signals(stop):
        agent.run_forever(args.interval, stop)
    return EXIT_OK


# -- main ---------------------------------------------------------------------------


@contextmanager
def _stop_on_signals(event: threading.Event | None = None) -> Iterator[None]:
    """SIGTERM/SIGINT: set ``event`` if given (stop after this step), else raise _Stop."""

    def handler(signum: int, frame: Any) -> None:
        if event is not None:
            event.set()
        else:
            raise _Stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def server_address(args: argparse.Namespace) -> str:
    return args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="strict") as file:
            lines = [line.strip() for line in file]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"--token-file: cannot read {path}: {reason}") from None
    token = next((line for line in lines if line and not line.startswith("#")), "")
    if not token:
        raise UsageError(f"--token-file: {path} holds no token")
    return token


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """``PageFusionClient`` keyword arguments from the security flags and environment.

    Raises:
        UsageError: contradictory flags or an unreadable token file.
    """
    if args.token is not None and args.token_file is not None:
        raise UsageError("give --token or --token-file, not both")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    token = args.token
    if args.token_file is not None:
        token = _read_token_file(args.token_file)
    elif token is None:
        token = os.environ.get(TOKEN_ENV) or None
    tls_ca = args.tls_ca or os.environ.get(TLS_CA_ENV) or None
    options: dict[str, Any] = {"token": token, "tls": bool(args.tls)}
    for key, value in (("tls_ca", tls_ca), ("tls_cert", args.tls_cert),
                       ("tls_key", args.tls_key), ("tls_server_name", args.tls_server_name)):
        if value is not None:
            options[key] = value
    return options


def _unavailable_hint(message: str, options: dict[str, Any]) -> str:
    """Why an UNAVAILABLE looks like a TLS mismatch, if it does."""
    lowered = message.lower()
    tls = options.get("tls") or "tls_ca" in options or "tls_cert" in options
    if not tls and ("socket closed" in lowered or "connection reset" in lowered):
        return " (a TLS server? use --tls-ca FILE)"
    if tls and "socket closed" in lowered and "tls_cert" not in options:
        return " (TLS failed: the server may want a client certificate: --tls-cert/--tls-key)"
    if tls and ("handshake" in lowered or "ssl" in lowered or "certificate" in lowered):
        if "certificate" in lowered and "tls_cert" not in options:
            return " (TLS failed: the server may want a client certificate: --tls-cert/--tls-key)"
        return " (TLS failed: check --tls-ca, --tls-cert/--tls-key and --tls-server-name)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        _error_line(f"{exc} (see '{exc.prog} --help')")
        return EXIT_USAGE
    try:
        from pagefusion.clients.client import PageFusionClient
        from pagefusion.clients.errors import PageFusionError
    except ImportError as exc:  # a broken install: still one line, no traceback
        _error_line(f"cannot load the pagefusion client: {exc}")
        return EXIT_FAILURE

    target = server_address(args)
    out = Output(as_json=args.json)
    if getattr(args, "offline", False):  # estimate: no server to connect to
        return int(args.handler(None, args, out))
    try:
        options = connection_options(args)
    except UsageError as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    try:
        with PageFusionClient(target, timeout=args.timeout, **options) as client:
            return int(args.handler(client, args, out))
    except PageFusionError as exc:
        message = exc.message
        if exc.code.name == "UNAVAILABLE":
            hint = _unavailable_hint(message, options)
            message = f"cannot reach pagefusion server at {target}: {message}{hint}"
        _error_line(f"{exc.code.name}: {' '.join(message.split())}")
        return EXIT_FAILURE
    except UsageError as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except _NoMetrics:
        _error_line("No metrics match the specified filter!")
        return EXIT_FAILURE
    except (KeyboardInterrupt, _Stop):
        _error_line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not worth a message; point stdout
        # at /dev/null so the interpreter's final flush does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except ValueError as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except OSError as exc:  # e.g. an unreadable --tls-ca; the message names the file
        _error_line(exc.strerror or str(exc))
        return EXIT_FAILURE
    except Exception as exc:  # a bug here; still one line, never a traceback
        _error_line(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
