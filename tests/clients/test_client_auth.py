"""The client, CLI and harness against servers with TLS, mutual TLS and tokens.

Certificates come from ``make_tls_files`` (a throwaway CA per module); the
servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clients_support import Cli

from pagefusion.clients.client import PageFusionClient, bearer_metadata
from pagefusion.clients.errors import PageFusionError
from pagefusion.clients.testing import RunningServer, TlsFiles, make_tls_files, run_server

TOKEN = "client-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "token"
    path.write_text(f"{TOKEN}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secure_server(pki: TlsFiles, token_file: Path) -> Iterator[RunningServer]:
    """Mutual TLS and a token: everything a client can be asked for."""
    args = [*pki.server_args(client_ca=True), "--auth-token-file", str(token_file)]
    with run_server(extra_args=args, tls=pki, token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(pki: TlsFiles, token_file: Path) -> Iterator[RunningServer]:
    """TLS and a token, no client certificates."""
    args = [*pki.server_args(), "--auth-token-file", str(token_file)]
    with run_server(extra_args=args, tls_ca=pki.ca, token=TOKEN) as server:
        yield server


def _env(server: RunningServer, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PAGEFUSION_TOKEN", "PAGEFUSION_TLS_CA", "PAGEFUSION_SERVER")}
    env["PAGEFUSION_SERVER"] = server.address
    env.update(extra)
    return env


def _run(server: RunningServer, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return Cli(server.address)(*args, env=_env(server, **env))


def _one_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pagefusion: error: "), lines[0]
    return lines[0].removeprefix("pagefusion: error: ")


# -- the library ------------------------------------------------------------------------


def test_harness_client_carries_tls_and_token(secure_server: RunningServer) -> None:
    with secure_server.client() as client:
        client.create_machine("auth-a", memory_source="memory:size=65536")
        assert [m.name for m in client.list_machines()] == ["machines/auth-a"]


def test_client_with_files_or_pem_bytes(secure_server: RunningServer, pki: TlsFiles) -> None:
    with PageFusionClient(secure_server.address, token=TOKEN, tls_ca=pki.ca,
                          tls_cert=str(pki.client_cert), tls_key=str(pki.client_key)) as client:
        client.get_fusion_stats()
    with PageFusionClient(secure_server.address, token=TOKEN, tls_ca=pki.ca.read_bytes(),
                          tls_cert=pki.client_cert.read_bytes(),
                          tls_key=pki.client_key.read_bytes()) as client:
        client.get_fusion_stats()


def test_client_errors_name_the_problem(secure_server: RunningServer) -> None:
    with secure_server.client(token=None) as client, pytest.raises(PageFusionError) as caught:
        client.get_fusion_stats()
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "CREDENTIALS_MISSING"
    assert str(caught.value).startswith("UNAUTHENTICATED: ")
    with secure_server.client(token="wrong-token-000000000000") as client, \
            pytest.raises(PageFusionError) as caught:
        client.get_fusion_stats()
    assert caught.value.reason == "TOKEN_INVALID"
    # no client certificate: the handshake fails before any call
    with secure_server.client(tls_cert=None, tls_key=None) as client, \
            pytest.raises(PageFusionError) as caught:
        client.get_fusion_stats()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_client_argument_checks(pki: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        PageFusionClient("127.0.0.1:1", tls_cert=pki.client_cert)
    with pytest.raises(ValueError, match="either credentials"):
        PageFusionClient("127.0.0.1:1", tls_ca=pki.ca,
                         credentials=grpc.ssl_channel_credentials())
    with pytest.raises(ValueError, match="printable ASCII"):
        PageFusionClient("127.0.0.1:1", token="two words")
    with pytest.raises(OSError, match=r"missing\.pem"):
        PageFusionClient("127.0.0.1:1", tls_ca=tmp_path / "missing.pem")
    assert bearer_metadata(f" {TOKEN}\n") == ("authorization", f"Bearer {TOKEN}")


def test_harness_waits_for_health_over_mutual_tls_without_a_token(
    pki: TlsFiles, token_file: Path
) -> None:
    """Health is exempt from tokens, so the wait needs only the TLS files."""
    args = [*pki.server_args(client_ca=True), "--auth-token-file", str(token_file)]
    with run_server(extra_args=args, tls_ca=pki.ca, tls_cert=pki.client_cert,
                    tls_key=pki.client_key) as server:
        assert server.process.poll() is None
        with server.client(token=TOKEN) as client:
            client.get_fusion_stats()


# -- the CLI ----------------------------------------------------------------------------


def test_cli_with_token_flag(secure_server: RunningServer, pki: TlsFiles) -> None:
    result = _run(secure_server, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                  "--tls-key", str(pki.client_key), "--token", TOKEN, "list", "vms")
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_cli_with_token_env_and_flags_after_the_verb(
    tls_server: RunningServer, pki: TlsFiles
) -> None:
    result = _run(tls_server, "fusion", "stats", "--tls-ca", str(pki.ca), PAGEFUSION_TOKEN=TOKEN)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_cli_with_token_file_and_ca_env(
    tls_server: RunningServer, pki: TlsFiles, token_file: Path
) -> None:
    result = _run(tls_server, "--token-file", str(token_file), "list", "vms",
                  PAGEFUSION_TLS_CA=str(pki.ca), PAGEFUSION_TOKEN="ignored-in-favour-of-the-file")
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_cli_auth_errors_are_one_line(tls_server: RunningServer, pki: TlsFiles) -> None:
    ca = ("--tls-ca", str(pki.ca))
    line = _one_line(_run(tls_server, *ca, "list", "vms"))
    assert line.startswith("UNAUTHENTICATED: ") and "Bearer <token>" in line
    line = _one_line(_run(tls_server, *ca, "--token", "not-the-token-0000000000", "list", "vms"))
    assert line == "UNAUTHENTICATED: the bearer token is not valid for this server"
    line = _one_line(_run(tls_server, "--token", TOKEN, "list", "vms"))
    assert line.startswith("UNAVAILABLE: ") and "--tls-ca" in line  # plaintext to TLS


def test_cli_mutual_tls_without_a_client_certificate(
    secure_server: RunningServer, pki: TlsFiles
) -> None:
    line = _one_line(_run(secure_server, "--tls-ca", str(pki.ca), "list", "vms",
                          PAGEFUSION_TOKEN=TOKEN))
    assert line.startswith("UNAVAILABLE: ") and "--tls-cert" in line


def test_cli_security_usage_errors(
    tls_server: RunningServer, pki: TlsFiles, token_file: Path, tmp_path: Path
) -> None:
    both = _one_line(_run(tls_server, "--token", TOKEN, "--token-file", str(token_file),
                          "list", "vms"), code=2)
    assert "not both" in both
    half = _one_line(_run(tls_server, "--tls-cert", str(pki.client_cert), "list", "vms"), code=2)
    assert "--tls-cert and --tls-key" in half
    missing = _one_line(_run(tls_server, "--token-file", str(tmp_path / "nope"), "list", "vms"),
                        code=2)
    assert "--token-file" in missing and "nope" in missing
    no_ca = _one_line(_run(tls_server, "--tls-ca", str(tmp_path / "ca.pem"), "list", "vms"))
    assert "ca.pem" in no_ca
