"""Generate Python code for protos/pagefusion/v1/*.proto into .gen/.

Run directly (`python scripts/genprotos.py`) or through the build (setup.py).
"""

from __future__ import annotations

import sys
from pathlib import Path


def generate(root: Path) -> Path:
    """Compile every proto under root/protos into root/.gen; return the package dir."""
    import grpc_tools
    from grpc_tools import protoc

    protos = root / "protos"
    out = root / ".gen"
    package = out / "pagefusion" / "v1"
    package.mkdir(parents=True, exist_ok=True)
    sources = sorted(
        str(p.relative_to(protos)) for p in (protos / "pagefusion" / "v1").glob("*.proto")
    )
    if sources:
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"--proto_path={protos}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {sources}")
    (package / "__init__.py").write_text(
        '"""Generated from protos/pagefusion/v1; do not edit."""\n'
    )
    (package / "py.typed").write_text("")
    return package


if __name__ == "__main__":
    print(generate(Path(__file__).resolve().parent.parent), file=sys.stderr)
