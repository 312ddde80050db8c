"""What envelopes and SecAgg+ cost per round, next to plaintext FedAvg, for 10 to 100 clients.

Every client's update is the delta of a rank-8 LoRA on ``q_proj`` and ``v_proj`` of a 12-layer,
768-wide Llama (48 tensors, 294,912 fp32 values; names and shapes from peft itself), filled with
random values of about 1e-3. All parties run in this one process and talk through the byte forms
they would send; the coordinator's CPU is measured with ``time.process_time`` around the
coordinator's calls only. Three ways of running one round are measured side by side:

1. plain: safetensors fp32 blobs; the coordinator parses all n and runs FedAvg;
2. envelope: the same blobs sealed to the job's X25519 key; the coordinator opens, parses, FedAvgs;
3. SecAgg+: the real protocol code in ``fedtune.secagg`` (signed key adverts, Shamir shares, masked
   inputs sealed in envelopes, unmasking), with a share of the clients dropping after sharing keys.

Besides the coordinator's minimal work (each message handled once), the script also measures the
coordinator as fedtune runs it: updates are opened and checked at upload and again at aggregation,
and ``SecureRound`` rebuilds its SecAgg+ session from the stored messages at every phase change.

    python benchmarks/secure_aggregation.py --clients 10 50 100 --out benchmarks/out/secure_aggregation.json

Prints a markdown table with PASS/FAIL against the targets and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.compression.codecs import get_codec
from fedtune.coordinator.validation import validate_update
from fedtune.crypto.envelope import UpdateBinding, open_envelope, raw_public, seal
from fedtune.crypto.keys import raw_public_bytes
from fedtune.errors import PreconditionFailed
from fedtune.peft_io import adapter_state, build_peft_model, bytes_to_tensors, tensors_to_bytes
from fedtune.secagg import (
    ClientSession,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    SecAggParams,
    ServerSession,
    UnmaskRequest,
    UnmaskShares,
    decode_sum,
    encode,
    max_scale,
)
from fedtune.secagg.adapter_vector import flatten, unflatten_sum, vector_len
from fedtune.secagg.adverts import verify_advert
from fedtune.secagg.graph import neighbor_graph
from fedtune.strategies import WeightedDelta, get_strategy

LORA_R = 8
LORA_TARGETS = ["q_proj", "v_proj"]
MODEL: dict[str, Any] = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 2048, "vocab_size": 256}
# SecureAggregationSpec's defaults; clip 1 is far above LoRA deltas of ~1e-3, which costs precision.
CLIP = 1.0
WEIGHT_CAP = 1000
DEFAULT_DEGREE, DEFAULT_THRESHOLD = 4, 3
SIGNATURE_BYTES = 64  # Ed25519
SIGN_KEY_BYTES = 32  # the enrolled Ed25519 public key relayed with each neighbour's advert
CODEC = get_codec("fp32")
JOB = "bench-job"
ROUND = 1

# Targets: Bonawitz et al. (CCS 2017) report 1.73x expansion at 1024 users; the envelope must stay cheap.
TARGET_EXPANSION = 1.5
TARGET_ENVELOPE_BYTES = 100
TARGET_ENVELOPE_MS = 5.0

DEGREE_RULE = ("threshold = degree/2 + 1; degree = smallest even number with degree - threshold >= "
               "ceil(dropout * n), at least 4: any ceil(dropout * n) dropouts, even all in one neighbourhood, "
               "leave every secret with threshold shares")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults take about three minutes on 2 CPU cores."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100], help="cohort sizes to measure")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="share of clients that drop after sharing keys (rounded up)")
    p.add_argument("--dropout-pattern", choices=["clustered", "random"], default="clustered",
                   help="clustered: all dropouts are neighbours of client 0, the worst case for unmasking")
    p.add_argument("--repeats", type=int, default=5, help="rounds per cohort size; the median CPU is reported")
    p.add_argument("--envelope-samples", type=int, default=50, help="updates sealed and opened for the ms figures")
    p.add_argument("--survival-trials", type=int, default=2000,
                   help="random dropout sets drawn per cohort size and degree for the survival table")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps process_time equal to single-core time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "secure_aggregation.json")
    args = p.parse_args(argv)
    if any(n < 4 for n in args.clients):
        p.error("--clients: SecAgg+ needs at least 4 clients per round")
    if not 0 <= args.dropout < 0.5:
        p.error(f"--dropout must be in [0, 0.5), got {args.dropout}")
    return args


# ---------------------------------------------------------------------------------------------- setup
def adapter_schema() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the LoRA adapter, as peft and fedtune.peft_io produce them."""
    base = LlamaForCausalLM(LlamaConfig(**MODEL))  # type: ignore[arg-type]  # its kwargs are typed per key
    model = build_peft_model(base, r=LORA_R, alpha=2.0 * LORA_R, dropout=0.0, target_modules=LORA_TARGETS)
    return {k: tuple(v.shape) for k, v in adapter_state(model).items()}


def make_delta(schema: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random update of the adapter's shape, values around 1e-3 like a few local steps give."""
    return {k: torch.randn(shape, generator=gen) * 1e-3 for k, shape in schema.items()}


def choose_degree(n: int, dropout: float) -> dict[str, Any]:
    """Degree and threshold such that ANY ceil(dropout * n) dropouts leave every secret recoverable.

    The protocol needs an even degree below n and ``threshold > degree / 2`` (else the coordinator
    could collect both secrets of one client). A secret is lost when more than
    ``degree - threshold`` of its holder's neighbours drop, and in the worst case all dropouts sit in
    one neighbourhood, so: threshold = degree / 2 + 1 (the smallest allowed, the most tolerant) and
    the smallest even degree with degree - threshold >= dropouts, at least fedtune's default 4.
    """
    drops = math.ceil(dropout * n)
    degree = max(4, 2 * (drops + 1))
    if degree >= n:
        raise SystemExit(f"{drops} dropouts out of n={n} cannot be tolerated with an even degree below n")
    threshold = degree // 2 + 1
    return {"degree": degree, "threshold": threshold, "tolerated": degree - threshold, "dropouts": drops,
            "bell_log_degree": 2 * math.ceil(math.log2(n))}


@contextmanager
def cpu(acc: dict[str, float], key: str) -> Iterator[None]:
    """Adds this block's process CPU seconds to ``acc[key]``."""
    t0 = time.process_time()
    try:
        yield
    finally:
        acc[key] = acc.get(key, 0.0) + time.process_time() - t0


def median_dicts(runs: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise median over repeats."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# ---------------------------------------------------------------------------------------------- envelopes
def envelope_ops(schema: dict[str, tuple[int, ...]], samples: int, seed: int) -> dict[str, Any]:
    """Exact envelope overhead and median seal/open time of one full-size update."""
    gen = torch.Generator().manual_seed(seed)
    job_key = X25519PrivateKey.generate()
    job_pk = raw_public(job_key.public_key())
    plain = tensors_to_bytes(CODEC.encode(make_delta(schema, gen)), metadata={"codec": CODEC.name})
    seal_s, open_s, overhead = [], [], set()
    for i in range(samples):
        binding = UpdateBinding(JOB, ROUND, f"client-{i}", f"update-{i}")
        t0 = time.process_time()
        sealed = seal(plain, job_pk, binding)
        t1 = time.process_time()
        opened = open_envelope(sealed, job_key, binding)
        t2 = time.process_time()
        assert opened == plain
        overhead.add(len(sealed) - len(plain))
        seal_s.append(t1 - t0)
        open_s.append(t2 - t1)
    if len(overhead) != 1:
        raise RuntimeError(f"envelope overhead varies between updates: {sorted(overhead)}")
    return {"payload_bytes": len(plain), "overhead_bytes": overhead.pop(), "samples": samples,
            "seal_ms_median": 1e3 * statistics.median(seal_s), "open_ms_median": 1e3 * statistics.median(open_s),
            "seal_ms_max": 1e3 * max(seal_s), "open_ms_max": 1e3 * max(open_s)}


# ---------------------------------------------------------------------------------------------- plain and envelope
def plain_round(schema: dict[str, tuple[int, ...]], n: int, seed: int) -> dict[str, Any]:
    """Coordinator CPU of one plaintext round, without and with envelopes."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    job_key = X25519PrivateKey.generate()
    job_pk = raw_public(job_key.public_key())
    blobs, sealed, examples, bindings = [], [], [], []
    for i in range(n):
        blob = tensors_to_bytes(CODEC.encode(make_delta(schema, gen)), metadata={"codec": CODEC.name})
        binding = UpdateBinding(JOB, ROUND, f"client-{i}", f"update-{i}")
        blobs.append(blob)
        sealed.append(seal(blob, job_pk, binding))
        bindings.append(binding)
        examples.append(rng.randint(16, 256))
    strategy = get_strategy("fedavg")
    t: dict[str, float] = {}
    with cpu(t, "plain"):
        strategy.combine([WeightedDelta(CODEC.decode(bytes_to_tensors(b)), e) for b, e in zip(blobs, examples)])
    with cpu(t, "envelope"):
        strategy.combine([WeightedDelta(CODEC.decode(bytes_to_tensors(open_envelope(s, job_key, b))), e)
                            for s, b, e in zip(sealed, bindings, examples)])
    # As fedtune's coordinator does it: open, parse and validate at upload, and all of it again to aggregate.
    with cpu(t, "envelope_fedtune"):
        for s, b in zip(sealed, bindings):
            validate_update(bytes_to_tensors(open_envelope(s, job_key, b)), schema, CODEC, None)
        strategy.combine([WeightedDelta(CODEC.decode(bytes_to_tensors(open_envelope(s, job_key, b))), e)
                            for s, b, e in zip(sealed, bindings, examples)])
    return {"cpu_s": t, "plaintext_bytes": len(blobs[0]), "sealed_bytes": len(sealed[0])}


# ---------------------------------------------------------------------------------------------- SecAgg+
def secagg_round(schema: dict[str, tuple[int, ...]], n: int, choice: dict[str, Any], pattern: str,
                 seed: int) -> dict[str, Any]:
    """One SecAgg+ round with real clients and coordinator in this process, exchanging bytes."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    round_id = hashlib.sha256(f"bench-{n}-{seed}".encode()).digest()
    params = SecAggParams(n_clients=n, degree=choice["degree"], threshold=choice["threshold"], clip=CLIP,
                          scale=max_scale(CLIP, n), vector_len=vector_len(schema), round_id=round_id)
    if pattern == "clustered":
        dropped = set(sorted(params.graph[0])[: choice["dropouts"]])
    else:
        dropped = set(rng.sample(range(n), choice["dropouts"]))
    job_key = X25519PrivateKey.generate()
    job_pk = raw_public(job_key.public_key())
    sign_keys = [Ed25519PrivateKey.generate() for _ in range(n)]  # enrolled once, not per round
    sign_pks = [raw_public_bytes(k) for k in sign_keys]
    examples = [rng.randint(16, 256) for _ in range(n)]
    deltas = [make_delta(schema, gen) for _ in range(n)]
    sent = [0] * n
    received = [len(params.to_bytes())] * n  # the round's parameters come with the task
    client_cpu: list[dict[str, float]] = [{} for _ in range(n)]
    co: dict[str, float] = {}  # coordinator CPU, minimal path
    rx: dict[str, float] = {}  # coordinator CPU spent checking messages as they arrive (fedtune path)
    server = ServerSession(params)

    # 1. begin: encode the delta, make the round keys, sign and send the advert.
    sessions, vectors, advert_msgs = [], [], {}
    for i in range(n):
        with cpu(client_cpu[i], "encode"):
            weight = min(examples[i], WEIGHT_CAP) / WEIGHT_CAP
            vectors.append(encode(flatten(deltas[i], weight, CLIP), CLIP, params.scale))
        with cpu(client_cpu[i], "advertise"):
            sessions.append(ClientSession(params, i))
            advert = sessions[i].advertise()
            advert_msgs[i] = (advert.to_bytes(), sign_keys[i].sign(advert.signed_bytes()))
        sent[i] += len(advert_msgs[i][0]) + SIGNATURE_BYTES
    for i, (payload, signature) in advert_msgs.items():
        with cpu(co, "adverts"), cpu(rx, "adverts"):
            server.add_advert(verify_advert(payload, signature, sign_pks[i]))

    # 2. share keys: each client gets its neighbours' signed adverts and sends one share per neighbour.
    share_msgs: dict[int, list[bytes]] = {}
    for i in range(n):
        with cpu(co, "adverts"):
            neighbours = sorted(server.adverts_for(i))
        relayed = [(*advert_msgs[j], sign_pks[j]) for j in neighbours]
        received[i] += sum(len(a) + len(s) + len(pk) for a, s, pk in relayed)
        with cpu(client_cpu[i], "share_keys"):
            adverts = {}
            for a, s, pk in relayed:
                advert = verify_advert(a, s, pk)
                adverts[advert.client_index] = advert
            share_msgs[i] = [s.to_bytes() for s in sessions[i].share_keys(adverts)]
        sent[i] += sum(map(len, share_msgs[i]))
    for i, raw in share_msgs.items():
        with cpu(co, "shares"), cpu(rx, "shares"):
            shares = [EncryptedShare.from_bytes(s) for s in raw]
        with cpu(co, "shares"):
            server.add_shares(i, shares)

    # 3. masked input: survivors mask their vector and upload it sealed; the dropouts vanish here.
    survivors = [i for i in range(n) if i not in dropped]
    uploads: dict[int, tuple[bytes, UpdateBinding]] = {}
    routed: dict[int, list[bytes]] = {}
    for i in range(n):
        with cpu(co, "shares"):
            routed[i] = [s.to_bytes() for s in server.shares_for(i)]
    for i in survivors:
        received[i] += sum(map(len, routed[i]))
        binding = UpdateBinding(JOB, ROUND, f"client-{i}", f"update-{i}")
        with cpu(client_cpu[i], "masked_input"):
            masked = sessions[i].masked_input(vectors[i], [EncryptedShare.from_bytes(s) for s in routed[i]])
            uploads[i] = (seal(masked.to_bytes(), job_pk, binding), binding)
        sent[i] += len(uploads[i][0])
    for i in survivors:
        with cpu(co, "inputs"):
            masked = MaskedInput.from_bytes(open_envelope(uploads[i][0], job_key, uploads[i][1]))
            server.add_masked_input(masked)
        with cpu(rx, "inputs"):  # fedtune opens and parses each masked input once more at upload
            MaskedInput.from_bytes(open_envelope(uploads[i][0], job_key, uploads[i][1]))

    # 4. unmask: survivors get the verdict and answer with their shares; the coordinator removes the masks.
    with cpu(co, "unmask"):
        request_bytes = server.unmask_request().to_bytes()
    unmask_msgs = {}
    for i in survivors:
        received[i] += len(request_bytes)
        with cpu(client_cpu[i], "unmask"):
            request = UnmaskRequest.from_bytes(request_bytes)
            unmask_msgs[i] = sessions[i].unmask(set(request.survivors), set(request.dropped)).to_bytes()
        sent[i] += len(unmask_msgs[i])
    for i in survivors:
        with cpu(co, "unmask"), cpu(rx, "unmask"):
            answer = UnmaskShares.from_bytes(unmask_msgs[i])
        with cpu(co, "unmask"):
            server.add_unmask(answer)
    with cpu(co, "aggregate"):
        total = server.aggregate()
    with cpu(co, "decode"):
        sums, weight = unflatten_sum(decode_sum(total, params.scale), schema, CLIP)
        mean = {k: v / weight for k, v in sums.items()}

    replay = replay_cpu(params, schema, advert_msgs, share_msgs, uploads, unmask_msgs, job_key)
    reference = get_strategy("fedavg").combine([WeightedDelta(deltas[i], examples[i]) for i in survivors])
    err = max(float((mean[k].double() - reference[k].double()).abs().max()) for k in schema)
    rms = math.sqrt(sum(float((reference[k].double() ** 2).sum()) for k in schema)
                    / sum(math.prod(s) for s in schema.values()))
    return {
        "params": {"n": n, "degree": params.degree, "threshold": params.threshold, "clip": CLIP,
                   "scale": params.scale, "vector_len": params.vector_len},
        "dropped": sorted(dropped),
        "coordinator_cpu_s": co,
        "coordinator_fedtune_cpu_s": {"on_receipt": sum(rx.values()), "replays": replay},
        "client_cpu_s": median_dicts([client_cpu[i] for i in survivors]),
        "client_total_cpu_s": [sum(client_cpu[i].values()) for i in survivors],
        "bytes_sent": [sent[i] for i in survivors],
        "bytes_received": [received[i] for i in survivors],
        "masked_input_sealed_bytes": len(uploads[survivors[0]][0]),
        "max_abs_error_vs_fedavg": err,
        "fedavg_rms": rms,
    }


def one_more_dropout_is_refused(n: int, choice: dict[str, Any], seed: int) -> bool:
    """Whether ``tolerated + 1`` dropouts in one neighbourhood make the round refuse its sum.

    Checks that the degree rule is tight and that going past it fails loudly, never with a wrong
    sum. A small vector keeps it cheap; the masks' size does not change which secrets can be rebuilt.
    """
    try:
        secagg_round({"w": (64,)}, n, {**choice, "dropouts": choice["tolerated"] + 1}, "clustered", seed)
    except PreconditionFailed:
        return True
    return False


def random_dropout_survival(n: int, degree: int, threshold: int, drops: int, trials: int, seed: int) -> float:
    """Share of random ``drops``-client dropout sets (after key sharing) whose sum can be unmasked.

    Pure combinatorics on fedtune's neighbour graph: every survivor's self-mask seed and every
    dropped client's mask key needs ``threshold`` shares from surviving neighbours.
    """
    rng = random.Random(seed)
    graph = neighbor_graph(n, degree, hashlib.sha256(f"survival-{n}".encode()).digest())
    ok = 0
    for _ in range(trials):
        alive = set(range(n)) - set(rng.sample(range(n), drops))
        ok += len(alive) >= threshold and all(len(graph[i] & alive) >= threshold for i in range(n))
    return ok / trials


def replay_cpu(params: SecAggParams, schema: dict[str, tuple[int, ...]],
               advert_msgs: dict[int, tuple[bytes, bytes]], share_msgs: dict[int, list[bytes]],
               uploads: dict[int, tuple[bytes, UpdateBinding]], unmask_msgs: dict[int, bytes],
               job_key: X25519PrivateKey) -> float:
    """CPU of the session rebuilds in fedtune.coordinator.secure_round.SecureRound.

    It replays the stored messages at each phase change (advertise->share, share->mask,
    mask->unmask) and once more to aggregate, so adverts are parsed 4 times, shares 3 times,
    masked inputs opened and parsed twice and unmask answers once.
    """

    def rebuild(upto: str) -> ServerSession:
        session = ServerSession(params)
        for advert, _ in advert_msgs.values():
            session.add_advert(KeyAdvert.from_bytes(advert))
        if upto == "advertise":
            return session
        for i in advert_msgs:
            session.adverts_for(i)
        for i, shares in share_msgs.items():
            session.add_shares(i, [EncryptedShare.from_bytes(s) for s in shares])
        if upto == "share":
            return session
        for i in share_msgs:
            session.shares_for(i)
        for sealed, binding in uploads.values():
            session.add_masked_input(MaskedInput.from_bytes(open_envelope(sealed, job_key, binding)))
        if upto == "mask":
            return session
        session.unmask_request()
        for raw in unmask_msgs.values():
            session.add_unmask(UnmaskShares.from_bytes(raw))
        return session

    t0 = time.process_time()
    for phase in ("advertise", "share", "mask"):
        rebuild(phase)
    unflatten_sum(decode_sum(rebuild("unmask").aggregate(), params.scale), schema, CLIP)
    return time.process_time() - t0


# ---------------------------------------------------------------------------------------------- report
def summarize(n: int, choice: dict[str, Any], plain: list[dict[str, Any]], sec: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats for one cohort size."""
    co = median_dicts([r["coordinator_cpu_s"] for r in sec])
    fed = [r["coordinator_fedtune_cpu_s"]["on_receipt"] + r["coordinator_fedtune_cpu_s"]["replays"] for r in sec]
    up = statistics.median_low(sec[0]["bytes_sent"])
    down = statistics.median_low(sec[0]["bytes_received"])
    plaintext = plain[0]["plaintext_bytes"]
    return {
        "n": n,
        "choice": choice,
        "plain_cpu_s": statistics.median(r["cpu_s"]["plain"] for r in plain),
        "envelope_cpu_s": statistics.median(r["cpu_s"]["envelope"] for r in plain),
        "envelope_fedtune_cpu_s": statistics.median(r["cpu_s"]["envelope_fedtune"] for r in plain),
        "secagg_cpu_s": sum(co.values()),
        "secagg_cpu_by_phase_s": co,
        "secagg_fedtune_cpu_s": statistics.median(fed),
        "plaintext_bytes": plaintext,
        "plaintext_sealed_bytes": plain[0]["sealed_bytes"],
        "secagg_bytes_sent": up,
        "secagg_bytes_received": down,
        "secagg_bytes_sent_max": max(sec[0]["bytes_sent"]),
        "secagg_bytes_received_max": max(sec[0]["bytes_received"]),
        "masked_input_sealed_bytes": sec[0]["masked_input_sealed_bytes"],
        "raw_fp32_bytes": 4 * (sec[0]["params"]["vector_len"] - 1),
        "expansion": (up + down) / plaintext,
        "expansion_raw": (up + down) / (4 * (sec[0]["params"]["vector_len"] - 1)),
        "expansion_sent_only": up / plaintext,
        "client_cpu_s": median_dicts([r["client_cpu_s"] for r in sec]),
        "client_total_cpu_s_median": statistics.median(statistics.median(r["client_total_cpu_s"]) for r in sec),
        "max_abs_error_vs_fedavg": max(r["max_abs_error_vs_fedavg"] for r in sec),
        "fedavg_rms": sec[0]["fedavg_rms"],
        "runs": {"plain": plain, "secagg": sec},
    }


def verdicts(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/FAIL against the targets; the expansion target is checked at the largest cohort."""
    big = max(rows, key=lambda r: r["n"])
    worst = max(big["expansion"], big["expansion_raw"])
    return [
        {"target": f"SecAgg+ bytes per client (sent + received) <= {TARGET_EXPANSION}x plaintext at n={big['n']}",
         "value": f"{worst:.4f}x", "pass": worst <= TARGET_EXPANSION},
        {"target": f"envelope overhead <= {TARGET_ENVELOPE_BYTES} B per update",
         "value": f"{env['overhead_bytes']} B", "pass": env["overhead_bytes"] <= TARGET_ENVELOPE_BYTES},
        {"target": f"envelope seal <= {TARGET_ENVELOPE_MS:g} ms per update (median)",
         "value": f"{env['seal_ms_median']:.2f} ms", "pass": env["seal_ms_median"] <= TARGET_ENVELOPE_MS},
        {"target": f"envelope open <= {TARGET_ENVELOPE_MS:g} ms per update (median)",
         "value": f"{env['open_ms_median']:.2f} ms", "pass": env["open_ms_median"] <= TARGET_ENVELOPE_MS},
    ]


def render(result: dict[str, Any]) -> str:
    """Markdown tables of the result."""
    rows, env = result["rows"], result["envelope"]
    lines = [
        ("| clients | degree / threshold (tolerates) | dropped | coordinator CPU: plain | envelopes | SecAgg+ "
         "| as fedtune runs it: envelopes / SecAgg+ | SecAgg+ bytes per client sent / received "
         "| expansion vs update / vs raw fp32 | client CPU (SecAgg+) |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["choice"]
        lines.append(
            f"| {r['n']} | {c['degree']} / {c['threshold']} ({c['tolerated']}) | {c['dropouts']} "
            f"| {r['plain_cpu_s']:.3f} s | {r['envelope_cpu_s']:.3f} s | {r['secagg_cpu_s']:.3f} s "
            f"| {r['envelope_fedtune_cpu_s']:.3f} s / {r['secagg_fedtune_cpu_s']:.3f} s "
            f"| {r['secagg_bytes_sent']:,} / {r['secagg_bytes_received']:,} B "
            f"| {r['expansion']:.4f}x / {r['expansion_raw']:.4f}x | {r['client_total_cpu_s_median'] * 1e3:.0f} ms |")
    r0 = rows[0]
    lines += [
        "",
        (f"Plaintext update: {r0['plaintext_bytes']:,} B (safetensors fp32, {result['adapter']['params']:,} values "
         f"= {r0['raw_fp32_bytes']:,} B raw, in {result['adapter']['tensors']} tensors); sealed "
         f"{r0['plaintext_sealed_bytes']:,} B. SecAgg+ masked input, sealed: {r0['masked_input_sealed_bytes']:,} B "
         f"at n={r0['n']}."),
        (f"Envelope: {env['overhead_bytes']} B per update; seal {env['seal_ms_median']:.2f} ms, open "
         f"{env['open_ms_median']:.2f} ms (CPU, median of {env['samples']} updates of {env['payload_bytes']:,} B)."),
        "",
        "| SecAgg+ coordinator CPU by phase (s) | " + " | ".join(f"n={r['n']}" for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for phase in rows[0]["secagg_cpu_by_phase_s"]:
        lines.append(f"| {phase} | " + " | ".join(f"{r['secagg_cpu_by_phase_s'][phase]:.3f}" for r in rows) + " |")
    lines += ["", "| SecAgg+ client CPU by step (ms, median client) | " + " | ".join(f"n={r['n']}" for r in rows)
              + " |", "|---|" + "---:|" * len(rows)]
    for step in rows[0]["client_cpu_s"]:
        lines.append(f"| {step} | " + " | ".join(f"{r['client_cpu_s'][step] * 1e3:.1f}" for r in rows) + " |")
    lines += ["", "Degree rule: " + result["degree_rule"] + ". Bell et al.'s O(log n) degree, 2*ceil(log2 n) = "
              + ", ".join(str(r["choice"]["bell_log_degree"]) for r in rows) + ", tolerates random dropouts only "
              "with high probability. One more dropout in one neighbourhood is refused: "
              + ", ".join(f"n={r['n']} {'yes' if r['one_more_dropout_refused'] else 'NO'}" for r in rows) + "."]
    lines += ["", f"| rounds that survive {result['config']['dropout']:.0%} random dropouts, degree/threshold: "
              f"share of {result['config']['survival_trials']} draws | " + " | ".join(f"n={r['n']}" for r in rows)
              + " |", "|---|" + "---:|" * len(rows)]
    for k, setting in enumerate(rows[0]["random_dropout_survival"]):
        cells = [f"{c['degree']}/{c['threshold']}: {c['survival']:.1%}"
                 for c in (r["random_dropout_survival"][k] for r in rows)]
        lines.append(f"| {setting['setting']} | " + " | ".join(cells) + " |")
    lines += ["", "| SecAgg+ vs FedAvg of the survivors | " + " | ".join(f"n={r['n']}" for r in rows) + " |",
              "|---|" + "---:|" * len(rows),
              "| max abs error | " + " | ".join(f"{r['max_abs_error_vs_fedavg']:.1e}" for r in rows) + " |",
              "| ... relative to the mean's RMS | "
              + " | ".join(f"{r['max_abs_error_vs_fedavg'] / r['fedavg_rms']:.1e}" for r in rows) + " |"]
    lines += ["", "| target | measured | verdict |", "|---|---:|---|"]
    for v in result["verdicts"]:
        lines.append(f"| {v['target']} | {v['value']} | {'PASS' if v['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def source() -> dict[str, Any]:
    """The fedtune commit measured, and whether fedtune/ had local changes."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "fedtune"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"repo": str(REPO), "commit": None}
    return {"repo": str(REPO), "commit": commit, "fedtune_dirty": bool(dirty)}


def machine(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "mem_bytes": mem, "torch": torch.__version__,
            "torch_threads": threads, "numpy": np.__version__}


def main(argv: list[str] | None = None) -> None:
    """Measures every cohort size, prints the tables and writes the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    schema = adapter_schema()
    n_params = sum(math.prod(s) for s in schema.values())
    print(f"adapter: {len(schema)} tensors, {n_params:,} values", flush=True)
    env = envelope_ops(schema, args.envelope_samples, args.seed)
    # One unrecorded round first: the first pass through each code path pays for imports and allocation.
    warm = min(args.clients)
    plain_round(schema, warm, args.seed)
    secagg_round(schema, warm, choose_degree(warm, args.dropout), args.dropout_pattern, args.seed)
    rows = []
    for n in args.clients:
        choice = choose_degree(n, args.dropout)
        plain, sec = [], []
        for rep in range(args.repeats):
            seed = args.seed * 1000 + rep
            plain.append(plain_round(schema, n, seed))
            sec.append(secagg_round(schema, n, choice, args.dropout_pattern, seed))
            print(f"n={n} repeat {rep + 1}/{args.repeats}: plain {plain[-1]['cpu_s']['plain']:.3f}s, SecAgg+ "
                  f"{sum(sec[-1]['coordinator_cpu_s'].values()):.3f}s coordinator CPU", flush=True)
        rows.append(summarize(n, choice, plain, sec))
        rows[-1]["one_more_dropout_refused"] = one_more_dropout_is_refused(n, choice, args.seed)
        bell = choice["bell_log_degree"] if choice["bell_log_degree"] < n else n - 1 - (n - 1) % 2
        rows[-1]["random_dropout_survival"] = [
            {"setting": label, "degree": d, "threshold": t,
             "survival": random_dropout_survival(n, d, t, choice["dropouts"], args.survival_trials, args.seed)}
            for label, d, t in (("fedtune default", DEFAULT_DEGREE, DEFAULT_THRESHOLD),
                                ("Bell et al. 2*ceil(log2 n)", bell, bell // 2 + 1),
                                ("this rule", choice["degree"], choice["threshold"]))
        ]
    result: dict[str, Any] = {
        "benchmark": "secure_aggregation",
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(args.threads),
        "source": source(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "adapter": {"tensors": len(schema), "params": n_params, "lora_r": LORA_R, "targets": LORA_TARGETS,
                    "model": MODEL},
        "degree_rule": DEGREE_RULE,
        "envelope": env,
        "rows": rows,
    }
    result["verdicts"] = verdicts(rows, env)
    result["total_seconds"] = time.time() - started
    table = render(result)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['total_seconds']:.0f}s in all)")


if __name__ == "__main__":
    main()
