"""Synthetic Windows guests built from real PE files with their real relocations.

Uses the Windows launchers pip vendors (distlib's t32.exe, t64.exe, w64.exe:
MSVC-built PE images with .reloc sections) and checks the guest's module
pages against pefile's own relocation of the same files.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from pagefusion.adapters.base import (
    PAGE_SIZE,
    AdapterContext,
    InvalidOptionError,
    InvalidSourceError,
    SourcePermissionError,
)
from pagefusion.adapters.registry import open_source
from pagefusion.adapters.synthetic_windows import SyntheticWindowsMemory

pefile = pytest.importorskip("pefile")
MiB = 1 << 20


def _launcher(name: str) -> Path:
    spec = importlib.util.find_spec("pip._vendor.distlib")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip's vendored distlib is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.exists():
        pytest.skip(f"{name} is not shipped by this pip")
    return path


def _guest(images: Path, profile: str, seed: int) -> SyntheticWindowsMemory:
    ctx = AdapterContext("vm", memory_size_bytes=256 * MiB, allowed_paths=(images.parent,))
    options = {"profile": profile, "seed": str(seed), "images": str(images)}
    mem = open_source("synthetic-windows", options, ctx)
    assert isinstance(mem, SyntheticWindowsMemory)
    return mem


def _module_pages(mem: SyntheticWindowsMemory, name: str) -> dict[int, bytes]:
    """Image page -> bytes, for the module's pages that are the image's (not dirtied)."""
    out = {}
    for section, address in mem.module_sections(name):
        count = section.pages if section.readonly else section.pages - section.pages // 2
        data = bytes(mem.read(address, count * PAGE_SIZE))
        for i in range(count):
            out[section.first + i] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
    return out


@pytest.mark.parametrize(("launcher", "profile"), [("t64.exe", "Windows10_64"),
                                                   ("t32.exe", "Windows7")])
def test_real_relocations_match_pefile(tmp_path: Path, launcher: str, profile: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(_launcher(launcher), images / "kernel32.dll")  # replaces the synthetic one
    shutil.copy(_launcher(launcher), images / "launcher.exe")  # joins the module set
    a, b = _guest(images, profile, 1), _guest(images, profile, 2)
    mods = {m.module_name: m for m in a.modules()}
    assert "launcher.exe" in mods and "kernel32.dll" in mods
    pe = pefile.PE(str(images / "kernel32.dll"))
    module = mods["kernel32.dll"]
    assert module.module_size == -(-pe.OPTIONAL_HEADER.SizeOfImage // PAGE_SIZE) * PAGE_SIZE
    assert len(module.regions) >= 3  # header, .text, .rdata, ...

    for mem in (a, b):
        base = next(m.base_address for m in mem.modules() if m.module_name == "kernel32.dll")
        reloc = pefile.PE(str(images / "kernel32.dll"))
        reloc.relocate_image(base)
        expected = bytearray(reloc.get_memory_mapped_image())
        expected += bytes(module.module_size - len(expected))
        pages = _module_pages(mem, "kernel32.dll")
        for page, data in pages.items():
            want = bytes(expected[page * PAGE_SIZE : (page + 1) * PAGE_SIZE])
            if page == 0:  # pefile also rewrites OptionalHeader.ImageBase; the loader's
                continue  # header handling is not modelled for real images
            assert data == want, f"image page {page}"

    pa, pb = _module_pages(a, "kernel32.dll"), _module_pages(b, "kernel32.dll")
    differ = {p for p in pa if pa[p] != pb[p]}
    fixups = set(a.fixup_pages("kernel32.dll").tolist()) & set(pa)
    assert differ == fixups
    share = len(a.fixup_pages("kernel32.dll")) / (module.module_size // PAGE_SIZE)
    print(f"{launcher}: {share:.0%} of image pages carry relocation fixups")


def test_bad_image_directories(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(_launcher("t32.exe"), images / "ntdll.dll")
    with pytest.raises(InvalidSourceError, match="machine") as err:
        _guest(images, "Windows10_64", 1)  # x86 image, x64 profile
    assert err.value.option == "images"
    (images / "ntdll.dll").write_bytes(b"MZ" + bytes(100))
    with pytest.raises(InvalidSourceError, match="not a usable PE image"):
        _guest(images, "Windows10_64", 1)
    with pytest.raises(InvalidOptionError, match="not a directory"):
        _guest(images / "ntdll.dll", "Windows10_64", 1)
    ctx = AdapterContext("vm", allowed_paths=(images,))
    with pytest.raises(SourcePermissionError):
        open_source("synthetic-windows", {"profile": "WindowsXP", "images": str(tmp_path)}, ctx)


def test_real_images_are_deterministic(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(_launcher("w64.exe"), images / "explorer.exe")
    a, b = _guest(images, "Windows10_64", 5), _guest(images, "Windows10_64", 5)
    for addr in range(0, 256 * MiB, 32 * MiB):
        assert np.array_equal(np.frombuffer(a.read(addr, 32 * MiB), np.uint8),
                              np.frombuffer(b.read(addr, 32 * MiB), np.uint8))
