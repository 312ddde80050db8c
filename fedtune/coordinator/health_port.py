"""The coordinator's gRPC health service: a plaintext health-only port, and a probe for it.

Kubernetes' native ``grpc:`` probes and most load balancers speak plaintext gRPC and present no
client certificate, so they cannot check a TLS or mTLS coordinator on its service port. With
``--health-port`` the coordinator also serves ``grpc.health.v1.Health`` (and nothing else) in
plaintext on a second port; it tells only SERVING or NOT_SERVING, and turns NOT_SERVING as soon as
a stop begins. ``fedtune coordinator health`` probes either port and exits 0 or 1, what Docker's
``HEALTHCHECK`` and systemd's ``ExecStartPost`` expect.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtune.client.channel import ClientTls, open_channel
from fedtune.errors import StateConflict

# Probes are small and rare; two threads answer them even while the service port is saturated.
_HEALTH_WORKERS = 2


def start_health_server(host: str, port: int, servicer: health.HealthServicer) -> tuple[grpc.Server, int]:
    """Serves ``servicer`` alone, in plaintext, on ``host:port`` (0 picks a free port).

    Returns:
        The started server and the port it is bound to.

    Raises:
        StateConflict: the port is taken or the address cannot be bound.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=_HEALTH_WORKERS, thread_name_prefix="health"),
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise StateConflict(f"cannot listen on {host}:{port} for --health-port: address in use or not available")
    server.start()
    return server, bound


@dataclass(frozen=True)
class ProbeResult:
    """What a health probe found: ``serving`` and one line saying so (or what went wrong)."""

    serving: bool
    message: str


def probe(address: str, tls: ClientTls, service: str = "", timeout: float = 5.0) -> ProbeResult:
    """Asks the health service at ``address`` whether ``service`` ("" for the whole server) is SERVING.

    Never raises for what the network or the server can do: every failure is a ProbeResult that
    is not serving, with the reason in one line (TLS settings that cannot work included).
    """
    try:
        channel = open_channel(address, tls)
    except Exception as e:  # noqa: BLE001 - unreadable TLS files and the like: a failed probe, said in one line
        return ProbeResult(False, f"cannot probe {address}: {e}")
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            return ProbeResult(False, f"{address} has no health status for service {service!r}")
        problem = tls.diagnose(e, address)
        detail = problem.message if problem is not None else f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
        return ProbeResult(False, f"not serving: {detail}")
    finally:
        channel.close()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    what = f"service {service!r}" if service else "coordinator"
    return ProbeResult(reply.status == health_pb2.HealthCheckResponse.SERVING, f"{what} at {address}: {name}")
