"""The hint path: VirtualBox's shared-module semantics on the engine."""

import numpy as np
import pytest
from engine_helpers import PAGE, FakeMemory, page

from pagefusion.adapters.base import GuestModule, ModuleRegion
from pagefusion.server.engine import (
    AlreadyExistsError,
    FailedPreconditionError,
    FusionConfig,
    FusionEngine,
    FusionMode,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PageState,
)


def hints_engine() -> FusionEngine:
    return FusionEngine(
        max_pool_bytes=64 << 20, hash_seed=3, config=FusionConfig(mode=FusionMode.HINTS)
    )


def module(base: int, regions, name="ntdll.dll", version="10.0.1", size=None) -> GuestModule:
    regs = tuple(ModuleRegion(a, s) for a, s in regions)
    return GuestModule(name, version, base, size or sum(r.size for r in regs), "Windows10_64", regs)


def guest(image_pages, at_page: int, total_pages: int = 32, fill_marker: int = 0) -> FakeMemory:
    """A machine whose module image sits at page ``at_page``; other pages unique."""
    pages = [page(0x40, marker=fill_marker * 1000 + i + 1) for i in range(total_pages)]
    for i, p in enumerate(image_pages):
        pages[at_page + i] = p
    return FakeMemory([(0, bytearray(b"".join(pages)))])


IMAGE = [page(0x11, 1), page(0x22, 2), page(0), page(0x33, 3)]


def test_position_matching_under_aslr_fuses_equal_pages_exactly():
    e = hints_engine()
    # Same module at different guest-physical places (ASLR) in three machines;
    # machine c carries a relocation fixup on its page 1.
    c_image = list(IMAGE)
    c_image[1] = page(0x22, 99)
    places = {"a": 4, "b": 10, "c": 20}
    images = {"a": IMAGE, "b": IMAGE, "c": c_image}
    for name, at in places.items():
        e.start_machine(name, guest(images[name], at, fill_marker=ord(name)), page_fusion=True)
        e.register_module(name, module(0x7FF0_0000 + at * PAGE, [(at * PAGE, 4 * PAGE)]))
    assert e.stats().host.pages_saved == 0  # HINTS mode: nothing fused by content
    assert e.check_shared_modules("a") == (3, 0)  # first offer: canonical frames
    assert e.check_shared_modules("b") == (3, 3)
    assert e.check_shared_modules("c") == (3, 2)  # the fixup page differs: stays private
    assert e.stats().host.pages_saved == 5
    assert e.page_info("c", (20 + 1) * PAGE).state == PageState.PRIVATE
    assert e.page_info("c", 20 * PAGE).share_count == 3
    # Checking again fuses nothing new.
    assert e.check_shared_modules("b") == (3, 0)
    for name, at in places.items():
        assert e.read(name, at * PAGE, 4 * PAGE) == b"".join(images[name])


def test_unaligned_region_and_module_identity():
    e = hints_engine()
    e.start_machine("a", guest(IMAGE, 2), page_fusion=True)
    e.start_machine("b", guest(IMAGE, 8), page_fusion=True)
    e.register_module("a", module(0x1000, [(2 * PAGE + 0x10, 2 * PAGE)]))
    # Different in-page offset: a different module identity, so no fusion.
    e.register_module("b", module(0x1000, [(8 * PAGE + 0x20, 2 * PAGE)]))
    e.check_shared_modules("a")
    # Three pages are touched, the third is a zero page: two checked.
    assert e.check_shared_modules("b") == (2, 0)
    # Same identity at another base: fuses.
    e.register_module("b", module(0x9000, [(8 * PAGE + 0x10, 2 * PAGE)]))
    assert e.check_shared_modules("b") == (4, 2)


def test_copy_on_write_of_hinted_pages_and_canonical_rewrite():
    e = hints_engine()
    e.start_machine("a", guest(IMAGE, 0), page_fusion=True)
    e.start_machine("b", guest(IMAGE, 0), page_fusion=True)
    mod = module(0x1000, [(0, 2 * PAGE)])
    for name in "ab":
        e.register_module(name, mod)
        e.check_shared_modules(name)
    assert e.write("b", 5, b"!") == 1
    assert e.read("a", 0, 8) == page(0x11, 1)[:8]
    # a's page 0 is now private and canonical; rewriting it in place drops
    # it as canonical, so c's original page cannot be matched against it.
    e.write("a", 0, b"\xee")
    e.start_machine("c", guest(IMAGE, 0), page_fusion=True)
    e.register_module("c", mod)
    checked, fused = e.check_shared_modules("c")
    assert (checked, fused) == (2, 1)  # page 1 fuses with a's canonical; page 0 is offered anew
    assert e.read("c", 0, PAGE) == IMAGE[0]


def test_register_errors_follow_virtualbox():
    e = hints_engine()
    e.start_machine("a", guest(IMAGE, 0), page_fusion=True)
    e.start_machine("off", guest(IMAGE, 0), page_fusion=False)
    mod = module(0x1000, [(0, PAGE)])
    e.register_module("a", mod)
    with pytest.raises(AlreadyExistsError):
        e.register_module("a", mod)
    with pytest.raises(FailedPreconditionError, match="clash"):
        e.register_module("a", module(0x1000, [(0, PAGE)], name="other.dll"))
    with pytest.raises(FailedPreconditionError, match="page fusion is off"):
        e.register_module("off", mod)
    with pytest.raises(OutOfRangeError, match="region 0"):
        e.register_module("a", module(0x5000, [(64 * PAGE, PAGE)]))
    cases = [
        (module(1, [(0, PAGE)], name="x" * 128), "module.module_name"),
        (module(1, [(0, PAGE)], version="v" * 16), "module.version"),
        (module(1, [(0, PAGE)] * 33), "module.regions"),
        (module(1, [(0, PAGE)], size=(1 << 30) + 1), "module.module_size"),
        (module(1, [], size=PAGE), "module.regions"),
    ]
    for bad, field in cases:
        with pytest.raises(InvalidArgumentError) as info:
            e.register_module("a", bad)
        assert info.value.field == field
    with pytest.raises(NotFoundError):
        e.unregister_module("a", module(0x2000, [(0, PAGE)]))


def test_module_limit_per_machine():
    e = hints_engine()
    e.start_machine("a", guest(IMAGE, 0), page_fusion=True)
    for i in range(2048):
        e.register_module("a", module(0x10000 + i * PAGE, [(0, PAGE)], name=f"m{i}"))
    with pytest.raises(InvalidArgumentError, match="2048"):
        e.register_module("a", module(0x1, [(0, PAGE)], name="one-more"))


def test_unregister_keeps_pages_shared_and_stop_drops_records():
    e = hints_engine()
    e.start_machine("a", guest(IMAGE, 0), page_fusion=True)
    e.start_machine("b", guest(IMAGE, 0), page_fusion=True)
    mod = module(0x1000, [(0, 2 * PAGE)])
    for name in "ab":
        e.register_module(name, mod)
        e.check_shared_modules(name)
    e.unregister_module("b", mod)
    assert e.registered_modules("b") == []
    assert e.page_info("b", 0).state == PageState.SHARED
    e.stop_machine("a")
    assert e.page_info("b", 0).state == PageState.PRIVATE
    h = e.stats().host
    assert h.guest_pages == h.frames_used + h.pages_saved + h.zero_pages


def test_modes_and_sharing_status():
    e = hints_engine()
    e.start_machine("a", guest(IMAGE, 0), page_fusion=True)
    e.start_machine("off", guest(IMAGE, 0), page_fusion=False)
    assert e.page_sharing_enabled("a") is True
    assert e.page_sharing_enabled("off") is False
    e.set_config(FusionConfig(mode=FusionMode.CONTENT))
    assert e.page_sharing_enabled("a") is False
    e.register_module("a", module(0x1000, [(0, PAGE)]))
    assert e.check_shared_modules("a") == (0, 0)


def test_domains_keep_hinted_pages_apart():
    e = hints_engine()
    e.start_machine("a", guest(IMAGE, 0), page_fusion=True, fusion_domain="red")
    e.start_machine("b", guest(IMAGE, 0), page_fusion=True, fusion_domain="blue")
    mod = module(0x1000, [(0, 2 * PAGE)])
    for name in "ab":
        e.register_module(name, mod)
        assert e.check_shared_modules(name) == (2, 0)
    assert e.stats().host.pages_saved == 0


def test_hinted_pages_count_exactly_in_random_layouts():
    """pages fused == equal, non-zero pages at equal positions, recomputed by a model."""
    rng = np.random.default_rng(5)
    e = hints_engine()
    n_pages = 16
    base_image = [page(int(v), marker=i + 1) for i, v in enumerate(rng.integers(1, 255, n_pages))]
    canonical: list[bytes | None] = [None] * n_pages
    total_fused = 0
    for m in range(5):
        img = list(base_image)
        for i in np.flatnonzero(rng.random(n_pages) < 0.3):
            img[i] = page(7, marker=5000 + m * 100 + int(i))  # a fixup page
        for i in np.flatnonzero(rng.random(n_pages) < 0.1):
            img[i] = page(0)
        at = int(rng.integers(0, 16))
        name = f"m{m}"
        e.start_machine(name, guest(img, at, total_pages=40, fill_marker=m + 1), page_fusion=True)
        e.register_module(name, module(0x40000 + at * PAGE, [(at * PAGE, n_pages * PAGE)]))
        expected = 0
        for i, content in enumerate(img):
            if not any(content):
                continue
            if canonical[i] is None:
                canonical[i] = content
            elif canonical[i] == content:
                expected += 1
        checked, fused = e.check_shared_modules(name)
        assert checked == sum(1 for c in img if any(c))
        assert fused == expected
        total_fused += fused
    assert e.stats().host.pages_saved == total_fused
