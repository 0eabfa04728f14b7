"""GuestMemoryService end to end: reads, writes and page states."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from pagefusion.adapters.memory import InMemoryGuestMemory, register_image, unregister_image
from pagefusion.v1 import guest_memory_pb2 as pb

Code = grpc.StatusCode
PAGE = 4096
MiB = 1 << 20


@pytest.fixture
def image():
    """A registered in-memory image: page 0 zero, pages 1-2 identical, page 3 unique, 4 MiB total,
    plus a second range at 0x10000000."""
    data = np.zeros(4 * MiB, dtype=np.uint8)
    data[PAGE : 3 * PAGE] = np.tile(np.arange(1, PAGE + 1, dtype=np.uint8), 2)
    data[3 * PAGE : 4 * PAGE] = 7
    data[4 * PAGE :] = np.random.default_rng(1).integers(0, 256, data.size - 4 * PAGE, np.uint8)
    high = np.full(PAGE, 9, dtype=np.uint8)
    memory = InMemoryGuestMemory([(0, data), (0x10000000, high)])
    register_image("guest-test", memory)
    yield data
    unregister_image("guest-test")


@pytest.fixture
def vm(api, image):
    api.create("vm", options={"image": "guest-test"}, page_fusion_enabled=True)
    api.start("vm")
    return "machines/vm"


def _read(api, name, address, length):
    return api.guest.ReadGuestMemory(
        pb.ReadGuestMemoryRequest(name=name, address=address, length=length)
    ).data


def _info(api, name, address):
    return api.guest.GetPageInfo(pb.GetPageInfoRequest(name=name, address=address))


def test_read_returns_guest_bytes(api, vm, image):
    assert _read(api, vm, 0, 4 * PAGE) == image[: 4 * PAGE].tobytes()
    assert _read(api, vm, PAGE + 10, 100) == image[PAGE + 10 : PAGE + 110].tobytes()
    assert _read(api, vm, 0x10000000, PAGE) == b"\x09" * PAGE


def test_read_of_4_mib_fits_the_message_limits(api, vm, image):
    assert _read(api, vm, 0, 4 * MiB) == image.tobytes()


@pytest.mark.parametrize("length", [0, 4 * MiB + 1])
def test_read_length_out_of_bounds(api, vm, expect_failure, length):
    failure = expect_failure(
        api.guest.ReadGuestMemory,
        pb.ReadGuestMemoryRequest(name=vm, address=0, length=length), Code.INVALID_ARGUMENT,
    )
    assert failure.field_violations() == ["length"]


@pytest.mark.parametrize("address", [4 * MiB, 0x20000000, 4 * MiB - PAGE])
def test_read_unmapped_is_out_of_range(api, vm, expect_failure, address):
    failure = expect_failure(
        api.guest.ReadGuestMemory,
        pb.ReadGuestMemoryRequest(name=vm, address=address, length=2 * PAGE), Code.OUT_OF_RANGE,
    )
    assert failure.reason == "ADDRESS_UNMAPPED"


def test_page_info_states(api, vm):
    assert _info(api, vm, 0) == pb.GetPageInfoResponse(state=pb.PAGE_STATE_ZERO, share_count=0)
    assert _info(api, vm, PAGE + 5) == pb.GetPageInfoResponse(
        state=pb.PAGE_STATE_SHARED, share_count=2
    )
    assert _info(api, vm, 3 * PAGE) == pb.GetPageInfoResponse(
        state=pb.PAGE_STATE_PRIVATE, share_count=1
    )
    assert _info(api, vm, 0x20000000).state == pb.PAGE_STATE_UNMAPPED


def test_write_copies_shared_page_on_write(api, vm, image):
    response = api.guest.WriteGuestMemory(
        pb.WriteGuestMemoryRequest(name=vm, address=PAGE + 8, data=b"hello")
    )
    assert response.pages_copied_on_write == 1
    expected = bytearray(image[PAGE : 3 * PAGE].tobytes())
    expected[8:13] = b"hello"
    assert _read(api, vm, PAGE, 2 * PAGE) == bytes(expected)
    assert _info(api, vm, PAGE).state == pb.PAGE_STATE_PRIVATE
    assert _info(api, vm, 2 * PAGE).state == pb.PAGE_STATE_PRIVATE
    again = api.guest.WriteGuestMemory(
        pb.WriteGuestMemoryRequest(name=vm, address=PAGE, data=b"x")
    )
    assert again.pages_copied_on_write == 0


def test_write_too_large(api, vm, expect_failure):
    failure = expect_failure(
        api.guest.WriteGuestMemory,
        pb.WriteGuestMemoryRequest(name=vm, address=0, data=bytes(4 * MiB + 1)),
        Code.INVALID_ARGUMENT,
    )
    assert failure.field_violations() == ["data"]


def test_write_unmapped_is_out_of_range(api, vm, expect_failure):
    expect_failure(
        api.guest.WriteGuestMemory,
        pb.WriteGuestMemoryRequest(name=vm, address=0x20000000, data=b"x"), Code.OUT_OF_RANGE,
    )


def test_write_of_4_mib_fits_the_message_limits(api, vm):
    data = bytes(range(256)) * (4 * MiB // 256)
    api.guest.WriteGuestMemory(pb.WriteGuestMemoryRequest(name=vm, address=0, data=data))
    assert _read(api, vm, 0, 4 * MiB) == data


@pytest.mark.parametrize("address", [2**64 - PAGE, 2**64 - 1, 2**63, 2**52])
def test_addresses_far_outside_are_out_of_range(api, vm, expect_failure, address):
    expect_failure(
        api.guest.ReadGuestMemory,
        pb.ReadGuestMemoryRequest(name=vm, address=address, length=2 * PAGE), Code.OUT_OF_RANGE,
    )
    expect_failure(
        api.guest.WriteGuestMemory,
        pb.WriteGuestMemoryRequest(name=vm, address=address, data=bytes(2 * PAGE)),
        Code.OUT_OF_RANGE,
    )
    assert _info(api, vm, address).state == pb.PAGE_STATE_UNMAPPED
