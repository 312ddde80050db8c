"""Download chunks encoded by hand: the same bytes as protobuf's, served on both of gRPC's lookup paths."""

from __future__ import annotations

import hashlib
import os

import pytest

from fedtune.coordinator.chunk_wire import encode_chunk, serialize_chunk
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import Admin, make_spec
from tests.test_rpc_contract import RawClient


@pytest.mark.parametrize(("offset", "size", "total"), [
    (0, 0, 0), (0, 5, 5), (1, 1, 1), (127, 128, 1 << 40), (128, 1 << 20, (1 << 64) - 1), (1 << 33, 300, (1 << 33) + 300),
])
def test_encoded_chunk_is_what_protobuf_serialises(offset: int, size: int, total: int) -> None:
    data = os.urandom(size)
    wire = encode_chunk(offset, data, total)
    assert wire == pb.Chunk(offset=offset, data=data, total_size=total).SerializeToString()
    parsed = pb.Chunk.FromString(wire)
    assert (parsed.offset, parsed.data, parsed.total_size) == (offset, data, total)


def test_serializer_passes_encoded_bytes_and_serialises_messages() -> None:
    wire = encode_chunk(3, b"abc", 6)
    assert serialize_chunk(wire) is wire
    assert serialize_chunk(pb.Chunk(offset=3, data=b"abc", total_size=6)) == wire


def test_download_is_served_as_chunks_to_registered_and_generic_callers(coordinator, admin: Admin) -> None:  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec())
    client = RawClient(coordinator.address, admin.token(job))
    ref = max(client.task().base_files, key=lambda f: f.size)
    request = pb.DownloadRequest(sha256=ref.sha256, offset=7)
    # The generated stub calls a registered method; a plain multicallable goes through the generic handler.
    registered = list(client.stub.Download(request, metadata=client.md("Download")))
    generic = list(client.channel.unary_stream("/fedtune.v1.ClientService/Download",
                                               request_serializer=pb.DownloadRequest.SerializeToString,
                                               response_deserializer=pb.Chunk.FromString)(
        request, metadata=client.md("Download")))
    for chunks in (registered, generic):
        assert [c.offset for c in chunks] == [7 + sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
        assert {c.total_size for c in chunks} == {ref.size}
        whole = client.download(ref.sha256)
        assert b"".join(c.data for c in chunks) == whole[7:]
        assert hashlib.sha256(whole).hexdigest() == ref.sha256
