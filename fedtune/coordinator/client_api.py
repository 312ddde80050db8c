"""ClientService servicer: thin wrappers that hand each RPC to :class:`Coordinator`."""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
from collections.abc import Iterator

import grpc

from fedtune.coordinator.aio_bridge import async_unary, offloader
from fedtune.coordinator.auth import metadata_value
from fedtune.coordinator.chunk_wire import encode_chunk
from fedtune.coordinator.engine import Decision
from fedtune.coordinator.rpc_errors import streaming, unary
from fedtune.coordinator.service import Coordinator, IncomingUpdate, TaskInfo
from fedtune.coordinator.state import Client
from fedtune.coordinator.store import CHUNK_SIZE
from fedtune.crypto.requests import CLIENT_KEY
from fedtune.errors import FedtuneError, InvalidInput, LimitExceeded
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from fedtune.spec import JobSpec

# A received chunk may be at most this big (the gRPC message limit is a little above it).
MAX_CHUNK_BYTES = CHUNK_SIZE


@functools.lru_cache(maxsize=256)
def _spec_parts(spec_json: str) -> tuple[str, str, str, int | None]:
    """What every task of a job carries from its (immutable) spec: training, privacy and evaluation
    JSON and the SecAgg weight cap, worked out once per job rather than once per task message."""
    spec = json.loads(spec_json)
    strategy = JobSpec.stored(spec_json).aggregation.build().client_options()
    training = json.dumps({**spec["training"], "codec": spec["codec"], "rounds": spec["rounds"],
                           "data": spec.get("data") or {}, "client_quantization": spec.get("client_quantization"),
                           **({"strategy": strategy} if strategy else {})})
    secure = spec.get("secure_aggregation")
    return (training, json.dumps(spec["privacy"]) if spec.get("privacy") else "",
            json.dumps(spec.get("evaluation") or {}), secure["weight_cap"] if secure else None)


def task_message(info: TaskInfo) -> pb.Task:
    """The wire form of a task."""
    training_json, privacy_json, evaluation_json, weight_cap = _spec_parts(info.job.spec_json)
    state = info.strategy_state
    return pb.Task(
        job_id=info.job.job_id,
        round=info.round,
        task_id=info.task_id,
        base_model_hash=info.job.base_hash,
        base_files=[pb.FileRef(path=f.path, sha256=f.sha256, size=f.size) for f in info.files],
        global_adapter=pb.FileRef(path=info.global_adapter.path, sha256=info.global_adapter.sha256,
                                  size=info.global_adapter.size),
        peft_config_json=info.job.peft_config_json,
        training_json=training_json,
        deadline_unix=info.deadline,
        max_update_bytes=info.max_update_bytes,
        job_public_key=info.job_public_key,
        secagg=_secagg_task(info, weight_cap),
        privacy_json=privacy_json,
        strategy_state=pb.FileRef(path=state.path, sha256=state.sha256, size=state.size) if state else None,
        evaluation_json=evaluation_json,
    )


def _secagg_task(info: TaskInfo, weight_cap: int | None) -> pb.SecAggTask | None:
    sec = info.secagg
    if sec is None or sec.phase != "advertise":
        return None
    return pb.SecAggTask(params=sec.params, index=sec.members.index(info.client_id), attempt=sec.attempt,
                         weight_cap=weight_cap)


def heartbeat_reply(decision: Decision, info: TaskInfo | None) -> pb.HeartbeatReply:
    """The wire form of what a heartbeat is told (a task's message reads the job's spec: the
    coordinator builds it in its pool, never on the event loop)."""
    if decision.action in ("train", "evaluate") and info is not None:
        kind = pb.HeartbeatReply.TRAIN if decision.action == "train" else pb.HeartbeatReply.EVALUATE
        return pb.HeartbeatReply(action=kind, task=task_message(info))
    if decision.action == "secagg":
        return pb.HeartbeatReply(action=pb.HeartbeatReply.SECAGG, secagg=pb.SecAggStep.FromString(decision.step))
    if decision.action == "stop":
        return pb.HeartbeatReply(action=pb.HeartbeatReply.STOP, message=decision.message)
    return pb.HeartbeatReply(action=pb.HeartbeatReply.WAIT, retry_after_seconds=decision.retry_after or 0.0,
                             message=decision.message)


PHASES = {pb.ADVERTISE: "advertise", pb.SHARE: "share", pb.UNMASK: "unmask"}


class ClientServicer(pb_grpc.ClientServiceServicer):
    """The client-facing API. Heartbeat is ``async`` (a held long-poll awaits on the event loop); the
    other methods block, and run in ``pool`` (fedtune.coordinator.aio_bridge)."""

    def __init__(self, coordinator: Coordinator, pool: concurrent.futures.Executor) -> None:
        self.co = coordinator
        self._offload = offloader(pool)

    def _client(self, context: grpc.ServicerContext) -> Client:
        # The interceptor verified the signature; this re-reads the client (and its token's status).
        return self.co.state.client(metadata_value(context.invocation_metadata(), CLIENT_KEY))

    @unary
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        client = self.co.join(request.token, request.client_name, request.device, request.sign_public_key,
                              request.kx_public_key, tuple(request.features), request.agent_version)
        return pb.JoinReply(client_id=client.client_id, job_id=client.job_id,
                            heartbeat_seconds=int(self.co.presence.heartbeat_seconds))

    @async_unary
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        return await self.co.heartbeat(lambda: self._client(context), request.wait_seconds,
                                       request.training_task_id, self._offload, heartbeat_reply)

    @unary
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        client = self._client(context)
        released, message = self.co.leave(client, request.task_id, request.reason)
        return pb.LeaveReply(released=released, message=message)

    @unary
    def SecAgg(self, request: pb.SecAggMessage, context: grpc.ServicerContext) -> pb.SecAggAck:
        client = self._client(context)
        phase = PHASES.get(request.phase)
        if phase is None:
            raise InvalidInput("secure-aggregation message has no valid phase (masked inputs go through Upload)")
        fresh = self.co.secagg_message(client, request.job_id, request.round, request.attempt, phase,
                                       request.payload, request.signature, list(request.shares))
        return pb.SecAggAck(duplicate=not fresh)

    @unary
    def ReportEval(self, request: pb.EvalReport, context: grpc.ServicerContext) -> pb.EvalAck:
        client = self._client(context)
        fresh = self.co.report_eval(client, request.job_id, request.round, request.num_examples,
                                    dict(request.metrics))
        return pb.EvalAck(duplicate=not fresh)

    @streaming
    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Streams a blob as ``Chunk`` messages, each encoded by hand (see fedtune.coordinator.chunk_wire)."""
        client = self._client(context)
        size = self.co.check_download(client, request.sha256, request.offset)
        offset = request.offset
        try:
            for data in self.co.store.iter_chunks(request.sha256, request.offset):
                yield encode_chunk(offset, data, size)
                offset += len(data)
        finally:
            self.co.count_download(client, offset - request.offset)
            self.co.traffic.served(client.job_id, offset - request.offset)

    @unary
    def Upload(self, request_iterator: Iterator[pb.UploadMessage], context: grpc.ServicerContext) -> pb.UploadReply:
        client = self._client(context)
        try:
            reply = self._upload(client, request_iterator)
        except Exception as e:
            # Counted against the caller's own job: a made-up job id in a header adds no series.
            self.co.traffic.rejected(client.job_id, (e.status if isinstance(e, FedtuneError)
                                                     else grpc.StatusCode.INTERNAL).name.lower())
            raise
        if not reply.duplicate:
            self.co.traffic.accepted(client.job_id, reply.bytes_received)
        return reply

    def _upload(self, client: Client, request_iterator: Iterator[pb.UploadMessage]) -> pb.UploadReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidInput("upload stream must start with a header")
        h = first.header
        if self.co.check_upload_header(client, h.job_id, h.round, h.task_id, h.update_id, h.total_size):
            return pb.UploadReply(update_id=h.update_id, duplicate=True, bytes_received=0)
        buf = bytearray()
        committed = False
        for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "chunk":
                chunk = msg.chunk
                if chunk.offset != len(buf):
                    raise InvalidInput(f"upload chunk at offset {chunk.offset}, expected offset {len(buf)}")
                if len(chunk.data) > MAX_CHUNK_BYTES:
                    raise LimitExceeded(f"upload chunk of {len(chunk.data)} bytes is over {MAX_CHUNK_BYTES}")
                if len(buf) + len(chunk.data) > h.total_size:
                    raise LimitExceeded(f"upload is longer than its declared {h.total_size} bytes")
                buf += chunk.data
            elif kind == "commit":
                committed = True
                break
            else:
                raise InvalidInput("upload stream has a second header")
        if not committed:
            raise InvalidInput(f"upload stream ended before its commit ({len(buf)} of {h.total_size} bytes)")
        if len(buf) != h.total_size:
            raise InvalidInput(f"upload ended early: {len(buf)} of {h.total_size} bytes")
        payload = bytes(buf)
        if hashlib.sha256(payload).hexdigest() != h.sha256:
            raise InvalidInput("upload sha256 does not match its payload")
        fresh = self.co.accept_update(client, IncomingUpdate(
            job_id=h.job_id, round=h.round, task_id=h.task_id, update_id=h.update_id,
            num_examples=h.num_examples, metrics=dict(h.metrics), codec=h.codec or "fp32", envelope=h.envelope,
            payload=payload,
        ))
        return pb.UploadReply(update_id=h.update_id, duplicate=not fresh, bytes_received=len(payload))

