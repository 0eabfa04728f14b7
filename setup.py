"""Build hook: generate pagefusion.v1 from protos/ (the single source of truth).

The generated modules are written to .gen/pagefusion/v1 (git-ignored) before
the normal build runs, and that folder is mapped to the `pagefusion.v1`
package in pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))

from genprotos import generate  # noqa: E402


class BuildWithProtos(build_py):
    def run(self) -> None:
        generate(ROOT)
        super().run()


generate(ROOT)  # the package folder must exist before setuptools looks for it
setup(cmdclass={"build_py": BuildWithProtos})
