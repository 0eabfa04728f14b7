"""The proto checks scripts/test runs (buf lint, buf breaking) catch what they are for.

Each test copies protos/ (buf.yaml and the committed v1 image included),
makes one change a careless edit could make, and runs buf as scripts/test
does: the change must fail with the rule that names it, while the protos as
committed pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "buf-image-v1.binpb"


def _buf(protos: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / "buf"), *args], cwd=protos,
                          capture_output=True, text=True, check=False, timeout=300)


@pytest.fixture
def protos(tmp_path: Path) -> Path:
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_committed_protos_pass(protos: Path) -> None:
    lint = _buf(protos, "lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = _buf(protos, "breaking", "--against", IMAGE)
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def test_renaming_a_field_is_a_breaking_change(protos: Path) -> None:
    machine = protos / "pagefusion" / "v1" / "machine.proto"
    assert re.search(r"string display_name = 2;", machine.read_text())
    _edit(machine, "string display_name = 2;", "string title = 2;")
    result = _buf(protos, "breaking", "--against", IMAGE, "--error-format=json")
    assert result.returncode != 0
    assert '"type":"FIELD_SAME_NAME"' in result.stdout.replace(" ", ""), result.stdout
    assert "display_name" in result.stdout


def test_removing_an_rpc_is_a_breaking_change(protos: Path) -> None:
    fusion = protos / "pagefusion" / "v1" / "fusion.proto"
    text = fusion.read_text()
    line = re.search(r"^\s*rpc VerifyFusion\(.*\n", text, re.M)
    assert line is not None
    fusion.write_text(text.replace(line.group(0), ""))
    result = _buf(protos, "breaking", "--against", IMAGE)
    assert result.returncode != 0
    assert "VerifyFusion" in result.stdout, result.stdout


def test_a_new_message_gets_the_standard_rules(protos: Path) -> None:
    extra = protos / "pagefusion" / "v1" / "extra.proto"
    extra.write_text(
        'syntax = "proto3";\n\npackage pagefusion.v1;\n\n'
        'option go_package = "pagefusion.dev/gen/pagefusion/v1;pagefusionv1";\n'
        "option java_multiple_files = true;\n"
        'option java_package = "dev.pagefusion.v1";\n\n'
        "// A badly named message.\nmessage bad_name {\n  // A field.\n  int32 Count = 1;\n}\n"
    )
    result = _buf(protos, "lint", "--error-format=json")
    assert result.returncode != 0
    assert '"type":"MESSAGE_PASCAL_CASE"' in result.stdout.replace(" ", ""), result.stdout
    assert '"type":"FIELD_LOWER_SNAKE_CASE"' in result.stdout.replace(" ", ""), result.stdout
