"""AdminService servicer: jobs, tokens and published adapters for operators and consumers."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc

from fedtune import __version__
from fedtune.coordinator import registry_api
from fedtune.coordinator.admin_access import AdminAccess
from fedtune.coordinator.identity_api import IdentityRpcs
from fedtune.coordinator.rpc_errors import streaming, unary
from fedtune.coordinator.service import Coordinator
from fedtune.coordinator.store import CHUNK_SIZE
from fedtune.coordinator.validation import aggregate_client_evals
from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from fedtune.spec import JobSpec

DEFAULT_TOKEN_TTL = 24 * 3600
MAX_TOKEN_USES = 100000


class AdminServicer(IdentityRpcs, pb_grpc.AdminServiceServicer):
    """The operator API."""

    def __init__(self, coordinator: Coordinator, access: AdminAccess) -> None:
        self.co = coordinator
        self.access = access  # identities and the audit log (IdentityRpcs)

    def _status(self, job_id: str) -> pb.JobStatus:
        co = self.co
        job = co.state.job(job_id)
        spec = co.spec(job_id)
        history = []
        evals: dict[int, list[tuple[int, str, int, dict[str, float]]]] = {}
        for report in co.state.client_evals(job_id):
            evals.setdefault(report[0], []).append(report)
        for r in co.state.rounds(job_id):
            m = dict(r.metrics)
            if r.round in evals:
                # Federated evaluation lands after publication: its example-weighted means join the round's metrics.
                m |= aggregate_client_evals(evals[r.round])
            updates = co.state.updates(job_id, r.round)
            history.append(pb.RoundSummary(
                round=r.round, state=r.state, cohort=len(r.cohort),
                contributors=int(m.get("contributors", len(updates))),
                metrics_json=json.dumps(m), bytes_up=int(m.get("bytes_up", 0)),
                bytes_down=int(m.get("bytes_down", co.state.bytes_down(job_id, r.round))),
                seconds=float(m.get("seconds", 0.0)),
                client_evals=[pb.ClientEval(client_id=c, num_examples=n, metrics_json=json.dumps(em))
                              for _, c, n, em in evals.get(r.round, [])],
                # What each client reported with its update (its train loss): `job status --watch`, `job report`.
                client_updates=[pb.ClientUpdate(client_id=u.client_id, num_examples=u.num_examples,
                                                metrics_json=json.dumps(u.metrics), bytes=u.size)
                                for u in updates],
                cohort_client_ids=list(r.cohort),
            ))
        clients = [
            pb.ClientSummary(client_id=c.client_id, name=c.name, connected=co.presence.is_live(c.client_id),
                             last_seen_unix=co.presence.last_seen(c.client_id) or 0.0)
            for c in co.state.clients(job_id)
        ]
        return pb.JobStatus(
            job_id=job.job_id, name=job.name, state=job.state, current_round=job.current_round,
            rounds=spec.rounds, history=history, clients=clients, message=job.message,
            base_model=job.base_model,
            base_metrics_json=job.base_eval_json or "{}",
            scheduling=self._scheduling(job_id, spec),
        )

    def _scheduling(self, job_id: str, spec: JobSpec) -> pb.Scheduling:
        position, reason = self.co.queue_place(job_id)
        res = spec.resources
        return pb.Scheduling(priority=spec.priority, cpus=res.cpus, gpus=res.gpus, memory_gb=res.memory_gb or 0.0,
                             queue_position=position, reason=reason, backend=self.co.backend_name,
                             engine_restarts=self.co.state.engine_restarts(job_id))

    @unary
    def CreateJob(self, request: pb.CreateJobRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        job = self.co.create_job(request.spec_yaml)
        return self._status(job.job_id)

    @unary
    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsReply:
        return pb.ListJobsReply(jobs=[self._status(j.job_id) for j in self.co.state.jobs()])

    @unary
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        return self._status(request.job_id)

    @unary
    def CancelJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        self.co.cancel_job(request.job_id)
        return self._status(request.job_id)

    @unary
    def CreateToken(self, request: pb.CreateTokenRequest, context: grpc.ServicerContext) -> pb.CreateTokenReply:
        uses = request.uses or 1
        if uses > MAX_TOKEN_USES:
            raise InvalidInput(f"--uses {uses} is over the maximum of {MAX_TOKEN_USES}")
        job = self.co.state.job(request.job_id)
        if job.state not in ("running", "queued"):
            raise InvalidInput(f"job {job.job_id} is {job.state}: no new clients can join it")
        token, expires, tid = self.co.state.add_token(request.job_id, uses, request.ttl_seconds or DEFAULT_TOKEN_TTL)
        return pb.CreateTokenReply(token=token, expires_unix=expires, token_id=tid)

    @unary
    def RevokeToken(self, request: pb.RevokeTokenRequest, context: grpc.ServicerContext) -> pb.RevokeTokenReply:
        if not request.token:
            raise InvalidInput("no token or token id to revoke")
        tid, clients = self.co.state.revoke_token(request.token)
        return pb.RevokeTokenReply(token_id=tid, clients=clients)

    @unary
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.CoordinatorInfo:
        return pb.CoordinatorInfo(version=__version__, signing_public_key=self.co.keys.signing_public_key())

    @unary
    def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext) -> pb.ListAdaptersReply:
        return registry_api.list_adapters(self.co, request)

    @unary
    def TagAdapter(self, request: pb.TagAdapterRequest, context: grpc.ServicerContext) -> pb.TagAdapterReply:
        return registry_api.tag_adapter(self.co, request)

    @unary
    def UntagAdapter(self, request: pb.UntagAdapterRequest, context: grpc.ServicerContext) -> pb.TagAdapterReply:
        return registry_api.untag_adapter(self.co, request)

    @streaming
    def PullAdapter(self, request: pb.PullAdapterRequest, context: grpc.ServicerContext) -> Iterator[pb.AdapterChunk]:
        rnd, path, manifest = registry_api.pull_target(self.co, request)
        names = sorted(manifest["files"]) + ["fedtune.json"]
        for name in names:
            data = (path / name).read_bytes()
            sha = manifest["files"].get(name, "")
            if not data:
                yield pb.AdapterChunk(path=name, sha256=sha, round=rnd, chunk=pb.Chunk(offset=0, data=b"", total_size=0))
            for off in range(0, len(data), CHUNK_SIZE):
                yield pb.AdapterChunk(path=name, sha256=sha, round=rnd,
                                      chunk=pb.Chunk(offset=off, data=data[off:off + CHUNK_SIZE], total_size=len(data)))
