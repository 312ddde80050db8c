"""Base-model download throughput on loopback: raw gRPC against fedtune's verified, resumable fetch.

A base model directory is made of the tiny-llama preset plus one extra file of ``--size-mb`` random
bytes (``blob.dat``: loading never reads it, but it is listed and served like any weight file). A
real coordinator process (``python -m fedtune coordinator start --in-process``) serves it in a job.
Three transfers of that file are timed, each into an empty directory on the same disk:

* raw: a bare gRPC server-streaming call of 1 MiB messages (no protobuf, no auth, no disk on
  either side beyond the server's read), from a server process started by this script;
* fresh: ``BlobCache.fetch`` against the coordinator (signed Download, chunks written to the
  ``.part`` file, sha256 checked, fsynced and renamed);
* resumed: the same with the first half already in the ``.part`` file (the prefix is hashed once,
  then only the second half travels).

On a shared machine the figures swing with the load: ``--repeat N`` times each fedtune transfer N
times and reports the median (every run is kept in the JSON).

    python benchmarks/artifact_throughput.py --size-mb 1024 --out benchmarks/out/artifact_throughput

Prints a markdown table and writes ``OUT/artifact_throughput.json`` and ``.md``. The temporary
directory (about 3x the file: the base, the coordinator's blob store, the client's cache) is
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.client.transfer import BlobCache
from fedtune.crypto.keys import raw_public_bytes
from fedtune.crypto.requests import sign_request
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from fedtune.strategies import CLIENT_FEATURES

CHUNK = 1 << 20
RAW_METHOD = "/raw.Blob/Read"
OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
SPEC = """\
name: throughput
base_model: {base}
peft: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
training: {{steps: 1, lr: 0.01, batch_size: 8, max_seq_len: 48}}
rounds: 1
clients_per_round: 1
min_clients: 1
round_deadline_seconds: 3600
cohort_wait_seconds: 0
"""


# ---------------------------------------------------------------------- raw baseline
def serve_raw(path: Path, port_file: Path) -> None:
    """A bare gRPC server streaming ``path`` in 1 MiB messages (bytes in, bytes out)."""

    def read(_request: bytes, _context: grpc.ServicerContext) -> Any:
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                yield block

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    handler = grpc.unary_stream_rpc_method_handler(read, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("raw.Blob", {"Read": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination()  # until SIGTERM ends the process


def raw_download(address: str) -> int:
    """Receives the raw stream, discarding it; returns the byte count."""
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        call = channel.unary_stream(RAW_METHOD, request_serializer=None, response_deserializer=None)
        return sum(len(block) for block in call(b"", timeout=600))


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 180.0) -> None:
    """Waits until ``path`` exists (or the process dies)."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{what} did not start (exit code {proc.poll()})")
        time.sleep(0.1)


# ---------------------------------------------------------------------- fedtune download
def make_base(target: Path, size_mb: int, models_root: Path) -> Path:
    """tiny-llama's files plus ``blob.dat`` of random bytes."""
    from fedtune.models import resolve_base

    preset = resolve_base("tiny-llama", models_root)
    target.mkdir(parents=True)
    for f in preset.iterdir():
        if f.is_file():
            shutil.copy2(f, target / f.name)
    with (target / "blob.dat").open("wb") as out:
        for _ in range(size_mb):
            out.write(os.urandom(CHUNK))
    return target


class Client:
    """A joined client (signed calls, as the agent makes them)."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.stub = pb_grpc.ClientServiceStub(self.channel)
        self.key = Ed25519PrivateKey.generate()
        reply = self.stub.Join(pb.JoinRequest(
            token=token, client_name="throughput", sign_public_key=raw_public_bytes(self.key),
            kx_public_key=raw_public_bytes(X25519PrivateKey.generate()), features=list(CLIENT_FEATURES)), timeout=60)
        self.client_id = reply.client_id

    def md(self, method: str) -> list[tuple[str, str]]:
        """Signed metadata for one call."""
        return sign_request(self.key, "/fedtune.v1.ClientService/" + method, self.client_id)

    def task(self, timeout: float = 120.0) -> pb.Task:
        """Polls until the coordinator hands out a task."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            reply = self.stub.Heartbeat(pb.HeartbeatRequest(client_id=self.client_id), metadata=self.md("Heartbeat"),
                                        timeout=30)
            if reply.action == pb.HeartbeatReply.TRAIN:
                return reply.task
            time.sleep(0.2)
        raise RuntimeError("no task")


def timed_fetch(client: Client, cache_dir: Path, ref: pb.FileRef, prefix: Path | None = None) -> dict[str, Any]:
    """One ``BlobCache.fetch`` into a fresh cache, optionally resuming from half of ``prefix``."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = BlobCache(cache_dir)
    have = 0
    if prefix is not None:
        have = ref.size // 2
        with prefix.open("rb") as src, cache.path(ref.sha256).with_suffix(".part").open("wb") as dst:
            left = have
            while left:
                block = src.read(min(CHUNK * 16, left))
                dst.write(block)
                left -= len(block)
        # The prefix must not be in the page cache only because it was just written: that is how
        # a resumed download finds it after the agent restarts, too, but its hash read counts.
    t0 = time.perf_counter()
    path, got = cache.fetch(client.stub, client.md("Download"), ref.sha256, ref.size, ref.path, progress=False)
    seconds = time.perf_counter() - t0
    assert path.stat().st_size == ref.size and got == ref.size - have
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"seconds": round(seconds, 3), "bytes_moved": got, "mb_per_s_moved": round(got / seconds / 1e6, 1),
            "mb_per_s_file": round(ref.size / seconds / 1e6, 1)}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time (the lower middle one of an even count), with every run's MB/s."""
    pick = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    return {**pick, "runs": len(runs), "mb_per_s_moved_each": [r["mb_per_s_moved"] for r in runs]}


def run(size_mb: int, work: Path, repeat: int = 1) -> dict[str, Any]:
    """All three measurements; returns them as a dict."""
    base = make_base(work / "base", size_mb, work / "models")
    blob = base / "blob.dat"
    size = blob.stat().st_size
    result: dict[str, Any] = {"size_bytes": size}

    port_file = work / "raw.port"
    raw = subprocess.Popen([sys.executable, __file__, "--serve-raw", str(blob), "--port-file", str(port_file)], cwd=REPO)
    try:
        wait_for(port_file, raw, "raw server")
        raw_download(f"127.0.0.1:{port_file.read_text()}")  # warm the page cache and the connection
        t0 = time.perf_counter()
        n = raw_download(f"127.0.0.1:{port_file.read_text()}")
        seconds = time.perf_counter() - t0
        assert n == size
        result["raw"] = {"seconds": round(seconds, 3), "bytes_moved": n, "mb_per_s_moved": round(n / seconds / 1e6, 1),
                         "mb_per_s_file": round(n / seconds / 1e6, 1)}
    finally:
        raw.send_signal(signal.SIGTERM)
        raw.wait(30)
    print(json.dumps({"raw": result["raw"]}), flush=True)

    state = work / "coord"
    log = (work / "coordinator.log").open("w")
    coord = subprocess.Popen([sys.executable, "-m", "fedtune", "coordinator", "start", "--state-dir", str(state),
                              "--port", "0", "--insecure", "--in-process"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(state / "coordinator.json", coord, "coordinator")
        while json.loads((state / "coordinator.json").read_text() or "{}").get("pid") != coord.pid:
            time.sleep(0.1)
        address = json.loads((state / "coordinator.json").read_text())["address"]
        admin_md = [("x-fedtune-admin", (state / "admin.token").read_text().strip())]
        with grpc.insecure_channel(address) as ch:
            admin = pb_grpc.AdminServiceStub(ch)
            t0 = time.perf_counter()
            job_id = admin.CreateJob(pb.CreateJobRequest(spec_yaml=SPEC.format(base=json.dumps(str(base)))),
                                     metadata=admin_md, timeout=600).job_id
            result["job_create_seconds"] = round(time.perf_counter() - t0, 2)
            token = admin.CreateToken(pb.CreateTokenRequest(job_id=job_id, uses=1, ttl_seconds=3600),
                                      metadata=admin_md, timeout=30).token
        client = Client(address, token)
        ref = next(f for f in client.task().base_files if f.path == "blob.dat")
        cache_dir = work / "client-cache"
        timed_fetch(client, cache_dir, ref)  # warm-up: the coordinator's copy into the page cache
        result["fresh"] = median_of([timed_fetch(client, cache_dir, ref) for _ in range(repeat)])
        print(json.dumps({"fresh": result["fresh"]}), flush=True)
        result["resumed"] = median_of([timed_fetch(client, cache_dir, ref, prefix=blob) for _ in range(repeat)])
        print(json.dumps({"resumed": result["resumed"]}), flush=True)
        client.channel.close()
    finally:
        coord.send_signal(signal.SIGTERM)
        try:
            coord.wait(30)
        except subprocess.TimeoutExpired:
            coord.kill()
        log.close()
    return result


def markdown(r: dict[str, Any]) -> str:
    """The result as a markdown table."""
    runs = r["fresh"].get("runs", 1)
    lines = [f"file: {r['size_bytes'] / 1e9:.2f} GB of random bytes"
             + (f"; fedtune rows: the median of {runs} runs (each: " + ", ".join(
                 f"{k} {'/'.join(str(x) for x in r[k]['mb_per_s_moved_each'])}" for k in ("fresh", "resumed")) + " MB/s)"
                if runs > 1 else ""), "",
             "| transfer | bytes moved | seconds | MB/s (bytes moved) | MB/s (whole file) |",
             "|---|---:|---:|---:|---:|"]
    names = {"raw": "raw gRPC stream, 1 MiB messages (no disk, no hash)",
             "fresh": "fedtune download, fresh (write, sha256, fsync)",
             "resumed": "fedtune download, resumed from 50% (prefix hashed once)"}
    for key, label in names.items():
        m = r[key]
        lines.append(f"| {label} | {m['bytes_moved']:,} | {m['seconds']} | {m['mb_per_s_moved']} | {m['mb_per_s_file']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the random file in MiB")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "artifact_throughput")
    parser.add_argument("--repeat", type=int, default=1, help="time each fedtune transfer this many times; report the median")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary files go (default: /tmp)")
    parser.add_argument("--serve-raw", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw is not None:
        serve_raw(args.serve_raw, args.port_file)
        return
    work = Path(tempfile.mkdtemp(prefix="fedtune-throughput-", dir=args.workdir))
    try:
        result = run(args.size_mb, work, max(1, args.repeat))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["date"] = datetime.now().isoformat(timespec="seconds")
    result["cpus"] = os.cpu_count()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "artifact_throughput.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "artifact_throughput.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
