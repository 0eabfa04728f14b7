"""TLS, mutual TLS and bearer tokens (server/auth.py), through the real server process.

A throwaway CA, server and client certificate are made per module with
``make_tls_files`` (the ``cryptography`` package); everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from pagefusion.clients.testing import RunningServer, TlsFiles, make_tls_files, run_server
from pagefusion.server.auth import (
    ConfigError,
    Security,
    check_authorization,
    is_loopback,
    load_tokens,
)
from pagefusion.v1 import machine_pb2, machine_pb2_grpc, performance_pb2, performance_pb2_grpc

TOKEN = "the-right-token-0123456789abcdef"
OTHER_TOKEN = "the-second-token-fedcba9876543210"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# pagefusion tokens\n{TOKEN}\n\n  {OTHER_TOKEN}  \n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def tls_token_server(pki: TlsFiles, token_file: Path) -> Iterator[RunningServer]:
    """TLS and tokens, no client certificates."""
    args = [*pki.server_args(), "--auth-token-file", str(token_file)]
    with run_server(extra_args=args, tls_ca=pki.ca, token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: TlsFiles) -> Iterator[RunningServer]:
    """Mutual TLS, no tokens."""
    with run_server(extra_args=pki.server_args(client_ca=True), tls=pki) as server:
        yield server


def _tls_channel(server: RunningServer, pki: TlsFiles, client_cert: bool = False) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(server.address, credentials)


def _list(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> object:
    stub = machine_pb2_grpc.MachineServiceStub(channel)
    return stub.ListMachines(machine_pb2.ListMachinesRequest(), metadata=metadata,
                             timeout=TIMEOUT)


def _refused(call: object) -> tuple[grpc.RpcError, error_details_pb2.ErrorInfo]:
    assert isinstance(call, grpc.RpcError)
    status = rpc_status.from_call(call)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc status details"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return call, info


# -- tokens over TLS ------------------------------------------------------------------


def test_tls_and_token_round_trip(tls_token_server: RunningServer, pki: TlsFiles) -> None:
    with _tls_channel(tls_token_server, pki) as channel:
        for token in (TOKEN, OTHER_TOKEN):  # every token of the file is valid
            reply = _list(channel, (("authorization", f"Bearer {token}"),))
            assert isinstance(reply, machine_pb2.ListMachinesResponse)
        # the scheme is case-insensitive (RFC 7235)
        _list(channel, (("authorization", f"bearer {TOKEN}"),))


@pytest.mark.parametrize(
    ("metadata", "reason", "words"),
    [
        ((), "CREDENTIALS_MISSING", "authorization: Bearer <token>"),
        ((("authorization", "Bearer not-the-token-000000000000"),), "TOKEN_INVALID",
         "not valid"),
        ((("authorization", f"Bearer {TOKEN}x"),), "TOKEN_INVALID", "not valid"),
        ((("authorization", f"Basic {TOKEN}"),), "CREDENTIALS_MALFORMED", "Bearer <token>"),
        ((("authorization", "Bearer"),), "CREDENTIALS_MALFORMED", "Bearer <token>"),
    ],
)
def test_missing_or_wrong_token_is_unauthenticated(
    tls_token_server: RunningServer, pki: TlsFiles,
    metadata: tuple[tuple[str, str], ...], reason: str, words: str,
) -> None:
    with _tls_channel(tls_token_server, pki) as channel, pytest.raises(grpc.RpcError) as caught:
        _list(channel, metadata)
    error, info = _refused(caught.value)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert words in error.details()  # type: ignore[attr-defined]
    assert info.reason == reason and info.domain == "pagefusion.dev"


def test_streaming_rpc_needs_a_token_too(tls_token_server: RunningServer, pki: TlsFiles) -> None:
    with _tls_channel(tls_token_server, pki) as channel:
        stub = performance_pb2_grpc.PerformanceServiceStub(channel)
        stream = stub.WatchMetrics(performance_pb2.WatchMetricsRequest(), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(stream))
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_health_and_reflection_need_no_token(
    tls_token_server: RunningServer, pki: TlsFiles
) -> None:
    with _tls_channel(tls_token_server, pki) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
        )
        services = {s.name for s in next(iter(responses)).list_services_response.service}
    assert "pagefusion.v1.MachineService" in services


def test_refusals_are_logged_by_code_without_the_token(
    tls_token_server: RunningServer, pki: TlsFiles
) -> None:
    wrong = "a-wrong-token-that-must-not-be-logged"
    with _tls_channel(tls_token_server, pki) as channel, pytest.raises(grpc.RpcError):
        _list(channel, (("authorization", f"Bearer {wrong}"), ("x-request-id", "auth-log-1")))
    deadline = time.monotonic() + TIMEOUT  # the line may be written just after the reply
    while True:
        lines = [json.loads(line) for line in tls_token_server.stderr_text().splitlines()
                 if line.startswith("{")]
        rpc = [line for line in lines if line.get("request_id") == "auth-log-1"]
        if rpc or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rpc and rpc[0]["event"] == "rpc" and rpc[0]["code"] == "UNAUTHENTICATED"
    serving = next(line for line in lines if line["event"] == "serving")
    assert serving["tls"] is True and serving["auth"] == "token"
    text = tls_token_server.stderr_text()
    assert wrong not in text and TOKEN not in text and OTHER_TOKEN not in text


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_token_server: RunningServer) -> None:
    with grpc.insecure_channel(tls_token_server.address) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        _list(channel, (("authorization", f"Bearer {TOKEN}"),))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_client_must_trust_the_servers_ca(
    tls_token_server: RunningServer, tmp_path: Path
) -> None:
    stranger = make_tls_files(tmp_path / "other-ca")
    credentials = grpc.ssl_channel_credentials(root_certificates=stranger.ca.read_bytes())
    with grpc.secure_channel(tls_token_server.address, credentials) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        _list(channel, (("authorization", f"Bearer {TOKEN}"),))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


# -- mutual TLS -----------------------------------------------------------------------


def test_mutual_tls_with_a_client_certificate(mtls_server: RunningServer, pki: TlsFiles) -> None:
    with _tls_channel(mtls_server, pki, client_cert=True) as channel:
        assert isinstance(_list(channel), machine_pb2.ListMachinesResponse)
    assert '"auth": "client-certificate"' in mtls_server.stderr_text()


def test_mutual_tls_without_a_client_certificate_fails(
    mtls_server: RunningServer, pki: TlsFiles
) -> None:
    with _tls_channel(mtls_server, pki) as channel, pytest.raises(grpc.RpcError) as caught:
        _list(channel)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mutual_tls_refuses_a_certificate_of_another_ca(
    mtls_server: RunningServer, pki: TlsFiles, tmp_path: Path
) -> None:
    stranger = make_tls_files(tmp_path / "other-ca")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=stranger.client_key.read_bytes(),
        certificate_chain=stranger.client_cert.read_bytes(),
    )
    with grpc.secure_channel(mtls_server.address, credentials) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        _list(channel)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_token_over_plaintext_loopback(token_file: Path) -> None:
    """Tokens work without TLS on loopback (the token never leaves the host)."""
    with run_server(extra_args=["--auth-token-file", str(token_file)]) as server, \
            grpc.insecure_channel(server.address) as channel:
        _list(channel, (("authorization", f"Bearer {TOKEN}"),))
        with pytest.raises(grpc.RpcError) as caught:
            _list(channel)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


# -- flags the server refuses: exit 1 and one log line ---------------------------------


def _start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagefusion.server.main", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--log-format", "json", *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=os.environ.copy(),
        stdin=subprocess.DEVNULL, check=False,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = json.loads(lines[0])
    assert line["event"] == "startup_failed" and line["level"] == "error"
    return str(line["error"])


def test_refuses_bad_flag_combinations(tmp_path: Path, pki: TlsFiles, token_file: Path) -> None:
    empty = tmp_path / "empty-tokens"
    empty.write_text("# nothing here\n\n")
    empty.chmod(0o600)
    spaced = tmp_path / "spaced-tokens"
    spaced.write_text("two words\n")
    spaced.chmod(0o600)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cases: list[tuple[list[str], list[str]]] = [
        (["--tls-cert", str(pki.server_cert)], ["--tls-cert needs --tls-key"]),
        (["--tls-key", str(pki.server_key)], ["--tls-key needs --tls-cert"]),
        (["--tls-client-ca", str(pki.ca)], ["--tls-client-ca needs --tls-cert"]),
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.server_key)],
         ["--tls-cert", "missing.pem", "No such file"]),
        (["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
         ["--tls-key", "client-key.pem", "is not the private key of --tls-cert"]),
        (["--tls-cert", str(not_pem), "--tls-key", str(pki.server_key)], ["not a PEM"]),
        ([*pki.server_args(), "--tls-client-ca", str(not_pem)], ["--tls-client-ca", "not PEM"]),
        (["--auth-token-file", str(tmp_path / "nope")], ["--auth-token-file", "cannot read"]),
        (["--auth-token-file", str(empty)], ["--auth-token-file", "holds no token"]),
        (["--auth-token-file", str(spaced)], ["line 1", "printable ASCII"]),
    ]
    for args, words in cases:
        message = _one_error_line(_start(tmp_path, *args))
        for word in words:
            assert word in message, (args, message)
    assert not (tmp_path / "data").exists(), "refused before opening the registry"


def test_refuses_a_non_loopback_listen_without_tls_and_auth(tmp_path: Path) -> None:
    # Refused before binding: nothing ever listens beyond loopback here.
    result = _start(tmp_path, "--listen", "0.0.0.0:0")
    message = _one_error_line(result)
    assert "--listen 0.0.0.0:0" in message and "--insecure" in message
    assert "TLS" in message and "caller authentication" in message


def test_the_listen_policy(pki: TlsFiles, token_file: Path) -> None:
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    # non-loopback: TLS and a way to authenticate callers, or --insecure
    with pytest.raises(ConfigError, match="no TLS"):
        Security.load(listen="0.0.0.0:50051", auth_token_file=token_file)
    with pytest.raises(ConfigError, match="no caller authentication"):
        Security.load(listen="[::]:50051", **tls)
    assert Security.load(listen="0.0.0.0:50051", auth_token_file=token_file, **tls).tls
    assert Security.load(listen="0.0.0.0:50051", tls_client_ca=pki.ca, **tls).client_certificates
    assert not Security.load(listen=":50051", insecure=True).tls
    # loopback: anything goes, plaintext and no tokens by default
    for listen in ("127.0.0.1:0", "127.0.0.2:1", "[::1]:0", "localhost:50051", "unix:/tmp/x"):
        assert is_loopback(listen), listen
        assert Security.load(listen=listen).describe() == {"tls": False, "auth": "none"}
    for listen in ("0.0.0.0:1", "[::]:1", ":1", "192.0.2.1:1"):
        assert not is_loopback(listen), listen


def test_token_file_format(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\n {TOKEN} \r\n{OTHER_TOKEN}\n")
    path.chmod(0o600)
    digests = load_tokens(path)
    assert len(digests) == 2
    assert check_authorization([("authorization", f"Bearer {OTHER_TOKEN}")], digests) is None
    assert check_authorization([("authorization", f"Bearer  {TOKEN} ")], digests) is None
    missing = check_authorization([("x-request-id", "1")], digests)
    assert missing is not None and missing.reason == "CREDENTIALS_MISSING"
    assert TOKEN not in missing.message


def test_sighup_rereads_the_token_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    tokens.chmod(0o600)
    old = (("authorization", f"Bearer {TOKEN}"),)
    new = (("authorization", f"Bearer {OTHER_TOKEN}"),)

    def code(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
        try:
            _list(channel, metadata)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[attr-defined, no-any-return]
        return grpc.StatusCode.OK

    def reload(server: RunningServer, event: str, count: int) -> None:
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while server.stderr_text().count(f'"event": "{event}"') < count:
            assert time.monotonic() < deadline, server.stderr_text()
            time.sleep(0.05)

    with run_server(extra_args=["--auth-token-file", str(tokens)]) as server, \
            grpc.insecure_channel(server.address) as channel:
        assert code(channel, new) is grpc.StatusCode.UNAUTHENTICATED
        tokens.write_text(f"{TOKEN}\n{OTHER_TOKEN}\n")
        reload(server, "tokens_reloaded", 1)
        assert code(channel, old) is code(channel, new) is grpc.StatusCode.OK
        tokens.write_text("# emptied by mistake\n")
        reload(server, "tokens_not_reloaded", 1)  # keeps the tokens in force
        assert code(channel, new) is grpc.StatusCode.OK
        tokens.write_text(f"{OTHER_TOKEN}\n")
        reload(server, "tokens_reloaded", 2)
        assert code(channel, old) is grpc.StatusCode.UNAUTHENTICATED
        assert code(channel, new) is grpc.StatusCode.OK
        assert TOKEN not in server.stderr_text() and OTHER_TOKEN not in server.stderr_text()
