"""`fedtune coordinator`: run the service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtune.cli.options import CaCert, ClientCert, ClientKey, Insecure

app = typer.Typer(help="Run the coordinator service.", no_args_is_help=True)


@app.command("start")
def start(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where jobs, updates and adapters are kept.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0 picks a free one).")] = 50051,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Server private key (PEM).")] = None,
    client_ca: Annotated[Path | None, typer.Option(
        "--client-ca", help="Require client certificates signed by this CA (mTLS).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext gRPC (loopback trials only).")] = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Run jobs on this existing Ray cluster (HOST:PORT of its head).")] = None,
    in_process: Annotated[bool, typer.Option(
        "--in-process", help="Run jobs as threads in this process, without Ray, quotas or a queue.")] = False,
    health_port: Annotated[int | None, typer.Option(
        "--health-port", min=0, max=65535,
        help="Also serve the gRPC health service, alone and in plaintext, on this port (Kubernetes grpc probes, "
             "load balancers).")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535,
        help="Serve Prometheus metrics over HTTP at /metrics on this port (0 picks a free one).")] = None,
    metrics_host: Annotated[str | None, typer.Option(
        "--metrics-host", help="Address of the metrics endpoint (default: the same as --host).")] = None,
) -> None:
    """Serve the client API, the admin API and gRPC health until SIGTERM or Ctrl-C.

    Jobs run as Ray actors, scheduled by priority and quota over one shared base: on the cluster
    at --ray-address, else on a local Ray started for this process. Without Ray installed (or with
    --in-process) they run as threads in this process. A restart on the same state dir resumes
    every job in the round it was in.
    """
    from fedtune.cluster.connect import ENABLE_HINT, ray_installed
    from fedtune.coordinator.server import serve_forever
    from fedtune.coordinator.tls import ServerTls
    from fedtune.errors import InvalidInput

    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("--tls-cert and --tls-key go together")
    if client_ca is not None and tls_cert is None:
        raise InvalidInput("--client-ca (mTLS) needs --tls-cert and --tls-key")
    if insecure and tls_cert is not None:
        raise InvalidInput("--insecure and --tls-cert contradict each other")
    if in_process and ray_address:
        raise InvalidInput("--in-process and --ray-address contradict each other")
    tls = ServerTls(tls_cert, tls_key, client_ca) if tls_cert is not None and tls_key is not None else None
    use_ray = bool(ray_address) or (not in_process and ray_installed())
    if not use_ray and not in_process:
        print(f"Ray is not installed: jobs run in this process without quotas; {ENABLE_HINT}", flush=True)
    if metrics_host is not None and metrics_port is None:
        raise InvalidInput("--metrics-host needs --metrics-port")
    if metrics_port and metrics_port == port:
        raise InvalidInput(f"--metrics-port {metrics_port} is the service's --port: pick another")
    metrics = None
    if metrics_port is not None:
        from fedtune.coordinator.metrics_export import MetricsServer

        # Bound first: a taken port ends the start before the service binds or loads anything.
        metrics = MetricsServer.bind(metrics_host or host, metrics_port)
    serve_forever(state_dir.resolve(), host, port, tls, insecure, ray=use_ray, ray_address=ray_address,
                  health_port=health_port, metrics=metrics)


@app.command("key")
def key(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The coordinator's state dir.")],
) -> None:
    """Print the coordinator's signing key (base64 Ed25519), what `adapters verify --public-key` takes.

    Read from the state dir; nothing is started and no key is created. Hand it to consumers over a
    channel you trust: it is what tells a published adapter from a forged one.
    """
    from fedtune.coordinator.keyring import signing_public_key

    typer.echo(signing_public_key(state_dir))


@app.command("health")
def health_check(
    address: Annotated[str | None, typer.Option(
        "--address", help="HOST:PORT to probe: the service port, or the --health-port (default: the "
                          "address in --state-dir, else 127.0.0.1:50051).")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="A local coordinator's state dir, to read its address and TLS mode.")] = None,
    service: Annotated[str, typer.Option(
        "--service", help="Service to ask about: '' (the whole coordinator), fedtune.v1.ClientService or "
                          "fedtune.v1.AdminService.")] = "",
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the answer.")] = 5.0,
    ca_cert: CaCert = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Probe the coordinator's gRPC health service: exit 0 when SERVING, 1 otherwise (one line says why).

    For Docker's HEALTHCHECK and service managers; Kubernetes probes the --health-port natively.
    """
    import json

    from fedtune.cli.admin_client import resolve_address
    from fedtune.client.channel import ClientTls
    from fedtune.coordinator.health_port import probe

    tls = ClientTls(ca_cert, client_cert, client_key, insecure)
    info = state_dir / "coordinator.json" if state_dir is not None else None
    # A local coordinator started with --insecure is probed in plaintext (over TLS, its certificate
    # lists localhost and 127.0.0.1: fedtune certs init).
    if (address is None and info is not None and info.is_file() and not insecure and ca_cert is None
            and json.loads(info.read_text()).get("tls") is False):
        tls = ClientTls(insecure=True)
    result = probe(resolve_address(address, state_dir), tls, service, timeout)
    typer.echo(result.message, err=not result.serving)
    if not result.serving:
        raise typer.Exit(1)
