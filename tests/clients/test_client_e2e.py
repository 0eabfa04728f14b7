"""PageFusionClient against a real server over a loopback socket."""

from __future__ import annotations

import time

import grpc
import pytest
from clients_support import memory_source
from google.rpc import error_details_pb2

from pagefusion.clients.client import MAX_TRANSFER_BYTES, PageFusionClient, PageFusionError
from pagefusion.clients.testing import RunningServer
from pagefusion.v1 import fusion_pb2, guest_memory_pb2, machine_pb2

PAGE = 4096


def test_create_get_list_delete(client: PageFusionClient, machine_id: str) -> None:
    created = client.create_machine(
        machine_id,
        display_name="Windows 10",
        memory_size_bytes=4 << 20,
        os_type="Windows10_64",
        page_fusion_enabled=True,
        fusion_domain="blue",
        memory_source=memory_source(),
    )
    assert created.name == f"machines/{machine_id}"
    assert created.state == machine_pb2.Machine.STATE_POWERED_OFF
    assert created.memory_source.adapter == "memory"
    assert created.memory_source.options["pattern"] == "mixed"
    # by id or resource name
    assert client.get_machine(machine_id) == created
    assert client.get_machine(created.name) == created
    assert created.name in [m.name for m in client.list_machines()]
    client.delete_machine(machine_id)
    with pytest.raises(PageFusionError) as caught:
        client.get_machine(machine_id)
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def test_list_machines_follows_page_tokens(client: PageFusionClient, machine_id: str) -> None:
    ids = [f"{machine_id}-{i}" for i in range(7)]
    for each in ids:
        client.create_machine(each, memory_source=memory_source())
    try:
        first = client.list_machines_page(page_size=2)
        assert len(first.machines) == 2 and first.next_page_token
        listed = [m.name for m in client.list_machines(page_size=2)]
        assert [n for n in listed if n.startswith(f"machines/{machine_id}-")] == [
            f"machines/{each}" for each in ids
        ]
        assert len(listed) == len(set(listed))
    finally:
        for each in ids:
            client.delete_machine(each)


def test_update_sends_a_mask_of_the_given_fields(client: PageFusionClient, machine_id: str) -> None:
    client.create_machine(
        machine_id, display_name="before", os_type="Linux_64", memory_source=memory_source()
    )
    updated = client.update_machine(machine_id, display_name="after", page_fusion_enabled=True)
    assert updated.display_name == "after"
    assert updated.page_fusion_enabled is True
    assert updated.os_type == "Linux_64"  # not in the mask: unchanged
    updated = client.update_machine(machine_id, memory_source=memory_source(seed=9))
    assert updated.memory_source.options["seed"] == "9"
    with pytest.raises(ValueError, match="at least one field"):
        client.update_machine(machine_id)
    client.delete_machine(machine_id)


def test_lifecycle_memory_and_errors(client: PageFusionClient, machine_id: str) -> None:
    client.create_machine(
        machine_id, memory_source=memory_source(pattern="pages"), page_fusion_enabled=True
    )
    running = client.start_machine(machine_id)
    assert running.state == machine_pb2.Machine.STATE_RUNNING
    try:
        # changing page fusion while running: FAILED_PRECONDITION with details
        with pytest.raises(PageFusionError) as caught:
            client.update_machine(machine_id, page_fusion_enabled=False)
        error = caught.value
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert error.detail(error_details_pb2.PreconditionFailure) is not None
        assert error.request_id

        data = client.read_guest_memory(machine_id, 0, 2 * PAGE)
        assert len(data) == 2 * PAGE
        page = bytes(range(256)) * (PAGE // 256)
        client.write_guest_memory(machine_id, PAGE, page)
        assert client.read_guest_memory(machine_id, PAGE, PAGE) == page
        info = client.get_page_info(machine_id, PAGE + 17)
        assert info.state == guest_memory_pb2.PAGE_STATE_PRIVATE
        assert info.share_count == 1

        with pytest.raises(PageFusionError) as caught:
            client.read_guest_memory(machine_id, 1 << 40, 16)
        assert caught.value.code is grpc.StatusCode.OUT_OF_RANGE

        with pytest.raises(PageFusionError) as caught:
            client.delete_machine(machine_id)
        assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION

        stats = client.get_fusion_stats()
        host = stats.host
        assert host.guest_pages == host.frames_used + host.pages_saved + host.zero_pages
        assert f"machines/{machine_id}" in [m.name for m in stats.machines]
        scan = client.run_scan([machine_id])
        assert scan.pages_scanned >= 0
    finally:
        stopped = client.stop_machine(machine_id)
        assert stopped.state == machine_pb2.Machine.STATE_POWERED_OFF
        client.delete_machine(machine_id)


def test_reads_and_writes_larger_than_one_call(client: PageFusionClient, machine_id: str) -> None:
    size = MAX_TRANSFER_BYTES + 3 * PAGE
    client.create_machine(machine_id, memory_source=f"memory:size={size},pattern=zero")
    client.start_machine(machine_id)
    try:
        blob = (b"pagefusion" * (size // 10 + 1))[: size - PAGE]
        client.write_guest_memory(machine_id, PAGE, blob)
        assert client.read_guest_memory(machine_id, PAGE, len(blob)) == blob
        assert client.read_guest_memory(machine_id, 0, PAGE) == bytes(PAGE)
    finally:
        client.stop_machine(machine_id)
        client.delete_machine(machine_id)


def test_error_codes(client: PageFusionClient, machine_id: str) -> None:
    client.create_machine(machine_id, memory_source=memory_source())
    try:
        with pytest.raises(PageFusionError) as caught:
            client.create_machine(machine_id, memory_source=memory_source())
        assert caught.value.code is grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(PageFusionError) as caught:
            client.create_machine("Not_Valid", memory_source=memory_source())
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(PageFusionError) as caught:
            client.create_machine(f"{machine_id}-x", memory_source="no-such-adapter")
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        # sources outside --allow-path are refused when opened
        client.create_machine(f"{machine_id}-y", memory_source="file:path=/etc/passwd")
        with pytest.raises(PageFusionError) as caught:
            client.start_machine(f"{machine_id}-y")
        assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
        client.delete_machine(f"{machine_id}-y")
    finally:
        client.delete_machine(machine_id)


def test_fusion_config_update_and_restore(client: PageFusionClient) -> None:
    before = client.get_fusion_config()
    try:
        after = client.update_fusion_config(mode="hints", stable_scans_before_merge=3)
        assert after.mode == fusion_pb2.FUSION_MODE_HINTS
        assert after.stable_scans_before_merge == 3
        assert after.pages_per_second == before.pages_per_second
        assert client.get_fusion_config() == after
        with pytest.raises(ValueError, match="unknown fusion mode"):
            client.update_fusion_config(mode="sometimes")
    finally:
        client.update_fusion_config(
            mode=before.mode,
            background_scan=before.background_scan,
            pages_per_second=before.pages_per_second,
            stable_scans_before_merge=before.stable_scans_before_merge,
        )


def test_request_id_reaches_the_server_log(server: RunningServer, client: PageFusionClient) -> None:
    with pytest.raises(PageFusionError) as caught:
        client.get_machine("never-created")
    request_id = caught.value.request_id
    assert request_id
    deadline = time.monotonic() + 5
    while request_id not in server.stderr_text():
        assert time.monotonic() < deadline, "request id not logged by the server"
        time.sleep(0.05)


def test_unreachable_server_is_unavailable() -> None:
    with (
        PageFusionClient("127.0.0.1:1", timeout=5) as client,
        pytest.raises(PageFusionError) as caught,
    ):
        client.get_fusion_config()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_wait_for_ready(client: PageFusionClient) -> None:
    client.wait_for_ready(timeout=5)
    with PageFusionClient("127.0.0.1:1") as nobody, pytest.raises(PageFusionError):
        nobody.wait_for_ready(timeout=0.3)
