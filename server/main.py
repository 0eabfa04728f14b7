"""``pagefusion-server``: the command-line entry point."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from pagefusion.server.app import PagefusionServer, Settings
from pagefusion.server.auth import ConfigError
from pagefusion.server.logs import configure_logging

log = structlog.get_logger("pagefusion.server")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(raw[-1:], 1)
    digits = raw[:-1] if raw[-1:] in units else raw
    try:
        value = int(digits) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pagefusion-server",
        description="Serve pagefusion (page fusion for virtual machine memory) over gRPC.",
    )
    parser.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT",
                        help="address to serve gRPC on (default: %(default)s; port 0 picks one)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), metavar="DIR",
                        help="where the machine registry lives (default: %(default)s)")
    parser.add_argument("--allow-path", action="append", type=Path, default=[], metavar="DIR",
                        help="directory memory sources may be opened under (repeatable)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus /metrics on this address")
    parser.add_argument("--max-pool-bytes", type=_size, metavar="BYTES",
                        help="cap on host frame pool memory (e.g. 8G); default: no cap")
    parser.add_argument("--huge-pages", action="store_true",
                        help="back the frame pool with transparent huge pages (off by default: "
                             "on VMs their first touch made first starts several times slower)")
    parser.add_argument("--log-format", choices=("json", "console", "auto"), default="auto",
                        help="log rendering (default: console on a terminal, else JSON)")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="the asyncio event loop serving calls (default: uvloop where it is "
                             "installed, else asyncio's own; uvloop serves small calls about "
                             "10%% faster)")
    parser.add_argument("--port-file", type=Path, metavar="FILE",
                        help="write the bound port to FILE once serving (for --listen ...:0)")
    parser.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                        help="seconds in-flight calls get on shutdown (default: %(default)s)")
    security = parser.add_argument_group(
        "security", "TLS and caller authentication; see the README's Security section")
    security.add_argument("--tls-cert", type=Path, metavar="FILE",
                          help="serve TLS with this PEM certificate chain (needs --tls-key)")
    security.add_argument("--tls-key", type=Path, metavar="FILE",
                          help="the PEM private key of --tls-cert")
    security.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                          help="require client certificates signed by these PEM CAs (mutual TLS)")
    security.add_argument("--auth-token-file", type=Path, metavar="FILE",
                          help="require 'authorization: Bearer <token>' on every RPC but health "
                               "and reflection; FILE holds the valid tokens, one per line "
                               "(SIGHUP re-reads it)")
    security.add_argument("--insecure", action="store_true",
                          help="allow a non-loopback --listen without TLS or caller "
                               "authentication (the network must be secured otherwise)")
    return parser.parse_args(argv)


async def serve(settings: Settings, port_file: Path | None = None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully.

    SIGHUP re-reads ``--auth-token-file``.
    """
    server = PagefusionServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
    port = await server.start()
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(port_file)  # atomic: readers never see a partial file
    await stop.wait()
    log.info("shutting_down", grace_seconds=settings.grace_seconds)
    await server.stop()


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory ``--event-loop`` names (None: asyncio's own loop).

    ``auto`` takes uvloop where it can be imported and falls back to
    asyncio's loop otherwise; ``uvloop`` requires it.

    Raises:
        ConfigError: ``uvloop`` was asked for and cannot be imported.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise ConfigError(
                f"--event-loop uvloop: uvloop cannot be imported ({exc}); "
                "install it (pip install uvloop) or use --event-loop asyncio") from None
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_format)
    try:
        factory = loop_factory(args.event_loop)
    except ConfigError as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    settings = Settings(
        listen=args.listen,
        data_dir=args.data_dir,
        allow_paths=tuple(args.allow_path),
        metrics_listen=args.metrics_listen,
        max_pool_bytes=args.max_pool_bytes,
        huge_pages=args.huge_pages,
        grace_seconds=args.grace,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        insecure=args.insecure,
    )
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(settings, args.port_file))
    except (OSError, sqlite3.Error, ConfigError) as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
