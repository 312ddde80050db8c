"""Starts the coordinator: gRPC server, health service, engines, and a clean stop on SIGTERM.

The gRPC server is a ``grpc.aio`` one, on an event loop in a thread of its own
(fedtune.coordinator.loop_thread): a held heartbeat is a coroutine there, and every other call
runs in a pool of ``workers`` threads (fedtune.coordinator.aio_bridge), so held calls take no
thread and their number is not bounded by the pool.
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import secrets
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtune.coordinator.admin_access import AdminAccess
from fedtune.coordinator.auth import AuthInterceptor
from fedtune.coordinator.chunk_wire import add_client_service
from fedtune.coordinator.loop_thread import LoopThread
from fedtune.coordinator.state import CoordinatorState
from fedtune.coordinator.tls import ServerTls, is_loopback
from fedtune.errors import InvalidInput, StateConflict
from fedtune.protos import fedtune_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from fedtune.coordinator.metrics_export import MetricsServer
    from fedtune.coordinator.service import Coordinator

log = logging.getLogger(__name__)

# Chunks are 1 MiB; 4 MiB leaves room for headers and is gRPC's usual default, now set on purpose.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Without this, Linux lets a second server bind the same port and steal half the calls.
    ("grpc.so_reuseport", 0),
    # Detect dead peers on long streams (downloads of large bases) within ~40 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A peer that connects and goes quiet, or opens a stream and never reads it, is bounded: HTTP/2
    # flow control caps what is buffered for it, an idle connection is closed after 5 minutes, and
    # every connection is recycled after 30 (in-flight calls get 5 more minutes; agents reconnect
    # on their own), which ends a stalled stream and frees its pool thread.
    ("grpc.max_connection_idle_ms", 5 * 60_000),
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 5 * 60_000),
]
GRACE_SECONDS = 5.0
ADMIN_TOKEN_FILE = "admin.token"
ADDRESS_FILE = "coordinator.json"


def _lock_state_dir(state_dir: Path) -> IO[str]:
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = (state_dir / "coordinator.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StateConflict(f"state dir {state_dir} is in use by another running coordinator") from None
    return handle


def admin_token(state_dir: Path) -> str:
    """The coordinator's admin token, created on first start (file mode 0600)."""
    path = state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    token = "fta_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class AioServer:
    """The coordinator's ``grpc.aio`` server, its event-loop thread and its thread pool, driven from
    ordinary threads."""

    def __init__(self, pool: futures.ThreadPoolExecutor, interceptors: list[grpc.aio.ServerInterceptor]) -> None:
        self.pool = pool  # the interceptor runs its checks in it too: the caller makes it, once
        self.loop = LoopThread()

        async def make() -> grpc.aio.Server:
            # Sync handlers are wrapped by the interceptor; the pool is also grpc's, for any it was not.
            return grpc.aio.server(migration_thread_pool=self.pool, interceptors=interceptors,
                                   options=SERVER_OPTIONS)

        self.server = self.loop.run(make())
        self._stopped = False

    def add_insecure_port(self, address: str) -> int:
        """Binds ``address`` in plaintext; the port bound (0: not bound)."""
        return self._bind(lambda: self.server.add_insecure_port(address))

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        """Binds ``address`` with TLS; the port bound (0: not bound)."""
        return self._bind(lambda: self.server.add_secure_port(address, credentials))

    def _bind(self, add: Any) -> int:
        async def run() -> int:
            return int(add())

        return self.loop.run(run())

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """As ``grpc.Server.add_generic_rpc_handlers``."""
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """As ``grpc.Server.add_registered_method_handlers``."""
        self.server.add_registered_method_handlers(service, handlers)

    def start(self) -> None:
        """Starts serving."""
        self.loop.run(self.server.start())

    def stop(self, grace: float | None) -> None:
        """Stops accepting calls, lets running ones finish for ``grace`` seconds, aborts the rest,
        then stops the loop and the pool (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.loop.run(self.server.stop(grace))
        finally:
            self.loop.close()
            self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class RunningCoordinator:
    """A started coordinator: its address and the handles needed to stop it."""

    address: str
    port: int
    server: AioServer
    coordinator: Coordinator
    health: health.HealthServicer
    lock: IO[str]
    # --health-port: plaintext, health only (fedtune.coordinator.health_port).
    health_server: grpc.Server | None = None
    health_port: int | None = None

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Stops accepting calls, lets running ones finish for ``grace`` seconds, then stops engines."""
        self.health.enter_graceful_shutdown()
        self.coordinator.release_waiters()  # held heartbeats answer now rather than at the grace's end
        self.server.stop(grace)
        self.coordinator.stop()
        if self.health_server is not None:
            self.health_server.stop(0)
        self.lock.close()


def start(state_dir: Path, host: str = "127.0.0.1", port: int = 50051, *, tls: ServerTls | None = None,
          insecure: bool = False, workers: int = 64, ray: bool = False,
          ray_address: str | None = None, health_port: int | None = None) -> RunningCoordinator:
    """Starts the service on ``host:port`` (port 0 picks a free one) over ``state_dir``.

    With ``health_port``, the health service alone is also served in plaintext on that port (for
    Kubernetes' gRPC probes, which speak no TLS).

    TLS is required unless ``insecure`` is set explicitly. With ``ray`` (a local Ray) or
    ``ray_address`` (an existing cluster), jobs run as Ray actors under the scheduler.
    ``workers``: the threads that run calls (held heartbeats take none).

    Raises:
        InvalidInput: neither TLS files nor ``insecure`` were given.
        StateConflict: the state dir is locked or from another version, or the port is taken.
    """
    if tls is None and not insecure:
        raise InvalidInput("TLS is required: pass --tls-cert and --tls-key (`fedtune certs init --out DIR` makes "
                           "trial ones), or --insecure for plaintext")
    if tls is None and not is_loopback(host):
        log.warning("plaintext gRPC on non-loopback address %s: anyone on the network can read the traffic", host)
    credentials = tls.credentials() if tls is not None else None
    # What a user can get wrong (a state dir in use or of another version, a taken port) is found
    # before the seconds of importing torch, transformers and peft that the service needs.
    lock = _lock_state_dir(state_dir)
    try:
        state = CoordinatorState(state_dir / "state.db")
    except BaseException:
        lock.close()
        raise
    # The state dir's admin token is the built-in admin; identities and the audit log sit beside it.
    access = AdminAccess(state_dir, admin_token(state_dir))
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
    server = AioServer(pool, [AuthInterceptor(state, access, pool)])
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(0)
        state.close()
        lock.close()
        raise StateConflict(f"cannot listen on {host}:{port}: address in use or not available")
    # NOT_SERVING until the service runs (set below): a probe of a starting coordinator says so.
    health_servicer = health.HealthServicer()
    for name in ("", "fedtune.v1.ClientService", "fedtune.v1.AdminService"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_server = None
    if health_port is not None:
        from fedtune.coordinator.health_port import start_health_server

        try:
            health_server, health_port = start_health_server(host, health_port, health_servicer)
        except BaseException:
            server.stop(0)
            state.close()
            lock.close()
            raise
    try:
        from fedtune.coordinator.admin_api import AdminServicer
        from fedtune.coordinator.client_api import ClientServicer
        from fedtune.coordinator.service import Coordinator

        coordinator = Coordinator(state_dir, state=state)
    except BaseException:
        server.stop(0)
        if health_server is not None:
            health_server.stop(0)
        state.close()
        lock.close()
        raise
    add_client_service(ClientServicer(coordinator, server.pool), server)  # Download's chunks encoded by hand
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(coordinator, access), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if ray or ray_address:
        try:
            coordinator.use_ray(ray_address)
        except BaseException:
            server.stop(0)
            if health_server is not None:
                health_server.stop(0)
            coordinator.stop()
            lock.close()
            raise
    server.start()
    coordinator.resume()
    for name in ("", "fedtune.v1.ClientService", "fedtune.v1.AdminService"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{bound}"
    (state_dir / ADDRESS_FILE).write_text(json.dumps({
        "address": address, "pid": os.getpid(), "tls": tls is not None,
        "mtls": tls is not None and tls.client_ca is not None, "health_port": health_port,
    }))
    log.info("coordinator listening on %s, state in %s", address, state_dir)
    return RunningCoordinator(address, bound, server, coordinator, health_servicer, lock, health_server,
                              health_port)


def serve_forever(state_dir: Path, host: str, port: int, tls: ServerTls | None, insecure: bool, *,
                  ray: bool = False, ray_address: str | None = None, health_port: int | None = None,
                  metrics: MetricsServer | None = None) -> None:
    """Runs the coordinator until SIGTERM or SIGINT, then stops it with a grace period.

    ``metrics``: a Prometheus endpoint bound beforehand (a taken port stops the start before the
    service binds anything); it exports this coordinator's jobs once it runs.
    """
    try:
        running = start(state_dir, host, port, tls=tls, insecure=insecure, ray=ray, ray_address=ray_address,
                        health_port=health_port)
    except BaseException:
        if metrics is not None:
            metrics.stop()
        raise
    mode = "plaintext" if tls is None else ("mTLS" if tls.client_ca else "TLS")
    jobs = (f"jobs as Ray actors on {ray_address}" if ray_address else "jobs as Ray actors on a local Ray" if ray
            else "jobs in this process")
    print(f"fedtune coordinator listening on {running.address} ({mode}, {jobs}, state dir {state_dir})", flush=True)
    if running.health_port is not None:
        print(f"gRPC health (plaintext, health only) on {host}:{running.health_port}", flush=True)
    if metrics is not None:
        metrics.attach(running.coordinator)
        print(f"Prometheus metrics on {metrics.url}", flush=True)
    # Everything loaded so far (torch, transformers, peft: millions of objects) lives as long as the
    # process: left out of the cyclic GC, a full collection scans only what serving allocates. It
    # took 250-400 ms, with every call waiting, every few seconds at 2,000 connected clients.
    gc.collect()
    gc.freeze()
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    if metrics is not None:
        metrics.stop()  # before the state it reads closes
    running.stop()
