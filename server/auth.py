"""Transport security and caller authentication: TLS, mutual TLS, bearer tokens.

What ``pagefusion-server``'s ``--tls-cert``, ``--tls-key``,
``--tls-client-ca``, ``--auth-token-file`` and ``--insecure`` turn into:

- :class:`Security` checks the flags together and loads the files once, at
  start, so a bad combination or an unreadable file stops the server with
  one precise :class:`ConfigError` instead of failing at the first call.
- :class:`TokenAuthInterceptor` rejects every RPC that does not carry
  ``authorization: Bearer <token>`` metadata naming one of the tokens of
  the token file, except the health service and server reflection, which
  load balancers and ``grpcurl list`` use without credentials.

Tokens are kept only as SHA-256 digests and compared with
:func:`hmac.compare_digest` against every known digest, so neither the
token nor how much of it matched shows in the timing, and no token is
ever logged.

Safe by default: the server listens on loopback without TLS or tokens. A
non-loopback ``--listen`` is refused unless it has both TLS and a way to
authenticate callers (tokens or client certificates), or ``--insecure``
says the operator secures the network some other way.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc import aio

from pagefusion.server.errors import ApiError, to_status

log = structlog.get_logger("pagefusion.server.auth")

AUTHORIZATION_KEY = "authorization"
BEARER = "bearer"

#: Method prefixes callable without a token: what health checkers and
#: ``grpcurl list`` need before they hold credentials.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

#: Tokens shorter than this are accepted with a warning: easy to guess.
SHORT_TOKEN = 16


class ConfigError(Exception):
    """The security flags are inconsistent or their files cannot be used.

    The message names the flag and, for files, the path; it never contains
    a token.
    """


# -- flags -> credentials ---------------------------------------------------------


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def load_tokens(path: Path) -> tuple[bytes, ...]:
    """The SHA-256 digests of the tokens in ``path``: one per line.

    Blank lines and lines starting with ``#`` are skipped; surrounding
    whitespace is ignored. A token must be printable ASCII without spaces
    (what gRPC metadata can carry).

    Raises:
        ConfigError: unreadable file, a malformed token (named by line
            number, never quoted), or no token at all.
    """
    flag = "--auth-token-file"
    raw = _read(flag, path)
    digests: list[bytes] = []
    short = 0
    for number, line in enumerate(raw.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith(b"#"):
            continue
        if not all(0x21 <= byte <= 0x7E for byte in token):
            raise ConfigError(
                f"{flag}: {path} line {number}: a token must be printable ASCII without spaces"
            )
        short += len(token) < SHORT_TOKEN
        digests.append(hashlib.sha256(token).digest())
    if not digests:
        raise ConfigError(f"{flag}: {path} holds no token (one token per line)")
    if short:
        log.warning("auth_tokens_short", path=str(path), count=short,
                    hint=f"use tokens of {SHORT_TOKEN}+ random characters, e.g. "
                         "`openssl rand -hex 32`")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("auth_token_file_readable_by_others", path=str(path),
                    mode=oct(stat.S_IMODE(mode)), hint=f"chmod 600 {path}")
    return tuple(digests)


def _listen_host(listen: str) -> str:
    if listen.startswith("unix:") or listen.startswith("unix-abstract:"):
        return listen
    host, _, _ = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]")


def is_loopback(listen: str) -> bool:
    """Whether ``HOST:PORT`` (or a ``unix:`` socket) is reachable from this host only.

    An empty host, ``0.0.0.0`` and ``[::]`` mean every interface; a host
    name counts as loopback only if it resolves to loopback addresses alone.
    """
    host = _listen_host(listen)
    if host.startswith(("unix:", "unix-abstract:")):
        return True
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host.lower() == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).split("%")[0]).is_loopback for address in addresses
    )


@dataclass(frozen=True)
class Security:
    """The loaded security settings of one server.

    Build it with :meth:`load`; ``credentials`` is None for plaintext.
    """

    credentials: grpc.ServerCredentials | None = None
    token_digests: tuple[bytes, ...] = ()
    client_certificates: bool = False

    @property
    def tls(self) -> bool:
        return self.credentials is not None

    def describe(self) -> dict[str, Any]:
        """Fields for the ``serving`` log line."""
        auth = [name for name, on in (("token", bool(self.token_digests)),
                                      ("client-certificate", self.client_certificates)) if on]
        return {"tls": self.tls, "auth": ",".join(auth) or "none"}

    def interceptor(self) -> TokenAuthInterceptor | None:
        return TokenAuthInterceptor(self.token_digests) if self.token_digests else None

    @classmethod
    def load(
        cls,
        *,
        listen: str,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        auth_token_file: Path | None = None,
        insecure: bool = False,
        metrics_listen: str | None = None,
    ) -> Security:
        """Check the flags together, load their files and apply the listen policy.

        Raises:
            ConfigError: one precise message about the first problem found.
        """
        if (tls_cert is None) != (tls_key is None):
            given, missing = (("--tls-cert", "--tls-key") if tls_key is None
                              else ("--tls-key", "--tls-cert"))
            raise ConfigError(f"{given} needs {missing}: give both to serve TLS, or neither")
        if tls_client_ca is not None and tls_cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key "
                              "(client certificates are checked only over TLS)")
        credentials = None
        if tls_cert is not None and tls_key is not None:
            credentials = _server_credentials(tls_cert, tls_key, tls_client_ca)
        digests = load_tokens(auth_token_file) if auth_token_file is not None else ()
        security = cls(credentials, digests, tls_client_ca is not None)
        security._check_exposure(listen, insecure, metrics_listen)
        return security

    def _check_exposure(self, listen: str, insecure: bool, metrics_listen: str | None) -> None:
        authenticated = bool(self.token_digests) or self.client_certificates
        if not is_loopback(listen):
            missing = [what for what, ok in (
                ("TLS (--tls-cert/--tls-key)", self.tls),
                ("caller authentication (--auth-token-file or --tls-client-ca)", authenticated),
            ) if not ok]
            if missing and not insecure:
                raise ConfigError(
                    f"--listen {listen} is reachable from other hosts but has no "
                    f"{' and no '.join(missing)}; anyone who can connect could read guest "
                    "memory. Add them, listen on 127.0.0.1, or pass --insecure if the "
                    "network is secured some other way")
            if missing:
                log.warning("insecure_listen", listen=listen, missing=missing)
        if metrics_listen and not is_loopback(metrics_listen):
            log.warning("metrics_unauthenticated", listen=metrics_listen,
                        hint="/metrics has no TLS or token; firewall it or listen on 127.0.0.1")


def _server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    cert_pem, key_pem = _read("--tls-cert", cert), _read("--tls-key", key)
    # gRPC reports unusable PEM only at the first handshake; Python's ssl
    # module says now, and whether the key matches the certificate.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"--tls-key {key} is not the private key of --tls-cert {cert}"
                              ) from None
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate chain and its "
            f"matching private key ({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {exc.strerror or exc}") from None
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read("--tls-client-ca", client_ca)
        try:
            context.load_verify_locations(cafile=os.fspath(client_ca))
        except ssl.SSLError as exc:
            raise ConfigError(f"--tls-client-ca {client_ca}: not PEM CA certificates "
                              f"({exc.reason or exc})") from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


# -- the interceptor ---------------------------------------------------------------


def unauthenticated(message: str, reason: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, message, reason=reason)


def check_authorization(metadata: Iterable[tuple[str, Any]] | None,
                        digests: tuple[bytes, ...]) -> ApiError | None:
    """None if ``metadata`` carries a valid bearer token, else the error to answer with."""
    value = None
    for key, item in metadata or ():
        if key == AUTHORIZATION_KEY:
            value = item.decode("latin-1") if isinstance(item, bytes) else str(item)
            break
    if value is None:
        return unauthenticated(
            "this server requires a token: send metadata 'authorization: Bearer <token>' "
            "(pagefusion --token-file FILE, or PAGEFUSION_TOKEN)", "CREDENTIALS_MISSING")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token:
        return unauthenticated(
            "malformed authorization metadata: expected 'Bearer <token>'",
            "CREDENTIALS_MALFORMED")
    given = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    matched = False
    for digest in digests:  # every digest, no early exit: timing says nothing
        matched |= hmac.compare_digest(given, digest)
    if not matched:
        return unauthenticated("the bearer token is not valid for this server",
                               "TOKEN_INVALID")
    return None


def _rejecting(handler: grpc.RpcMethodHandler, error: ApiError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails with ``error``."""
    status = to_status(error)

    async def reject(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            reject, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            reject, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            reject, handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        reject, handler.request_deserializer, handler.response_serializer)


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC but health and reflection.

    Placed inside the logging interceptor, so a refused call is logged in
    its per-RPC line with code ``UNAUTHENTICATED`` (and nothing of the token).

    Args:
        digests: SHA-256 digests of the valid tokens (see :func:`load_tokens`).
    """

    def __init__(self, digests: Iterable[bytes]) -> None:
        self._digests = tuple(digests)

    def replace_tokens(self, digests: Iterable[bytes]) -> None:
        """Accept these tokens from the next call on (token rotation without a restart)."""
        self._digests = tuple(digests)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        error = check_authorization(handler_call_details.invocation_metadata, self._digests)
        return handler if error is None else _rejecting(handler, error)
