"""Aggregation strategies in real federated jobs: real gRPC, real agents, the coordinator's state."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.crypto.keys import raw_public_bytes
from fedtune.peft_io import bytes_to_tensors, tensors_to_bytes
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from fedtune.strategies import CLIENT_FEATURES
from tests.conftest import Admin, make_spec
from tests.test_methods import run_agent_threads
from tests.test_rpc_contract import RawClient


def _spec(eval_file: Path, aggregation: str, *, rounds: int = 2, clients: int = 3, steps: int = 8,
          extra: str = "") -> str:
    return make_spec(eval_file, steps=steps, rounds=rounds, clients=clients) + f"aggregation: {aggregation}\n" + extra


@pytest.mark.parametrize(("strategy", "stateful"), [
    ("{strategy: fedadam, options: {server_lr: 0.01}}", True),
    ("{strategy: fedtrimmedavg, options: {beta: 0.34}}", False),
    ("{strategy: fedprox, options: {mu: 0.1}}", False),
    ("{strategy: scaffold}", True),
])
def test_each_strategy_family_runs_a_federated_job(coordinator, admin: Admin, fed_data, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   strategy: str, stateful: bool) -> None:
    clients, eval_file = fed_data
    job = admin.create_job(_spec(eval_file, strategy))
    run_agent_threads(coordinator, admin, job, clients[:3], tmp_path)
    status = admin.job(job)
    assert status.state == "finished", status.message
    base = json.loads(status.base_metrics_json)["eval_loss"]
    last = json.loads(status.history[-1].metrics_json)
    assert last["contributors"] == 3 and last["eval_loss"] < base
    manifest = json.loads((coordinator.coordinator.adapters_root / job / "round-2" / "fedtune.json").read_text())
    name = strategy.split(",")[0].split(":")[1].strip(" }")
    assert manifest["aggregation"]["strategy"] == name
    state = coordinator.coordinator.state
    kept = [state.strategy_state(job, r) for r in (1, 2)]
    assert all(kept) if stateful else not any(kept)
    if name == "scaffold":
        # Every update carried a control variate beside its delta: twice the bytes of a plain one.
        ups = state.updates(job, 2)
        assert all(u.size > 1.9 * coordinator.coordinator.store.size(state.job(job).initial_adapter) for u in ups)
        c = bytes_to_tensors(coordinator.coordinator.store.read(kept[1]))
        assert set(c) == {f"c/{k}" for k in bytes_to_tensors(coordinator.coordinator.store.read(
            state.job(job).initial_adapter))}
        assert any(float(v.abs().sum()) > 0 for v in c.values())


def _join(token: str, features: list[str]) -> pb.JoinRequest:
    return pb.JoinRequest(token=token, sign_public_key=raw_public_bytes(Ed25519PrivateKey.generate()),
                          kx_public_key=raw_public_bytes(X25519PrivateKey.generate()), agent_version="0.1.0",
                          features=features)


@pytest.mark.parametrize("strategy", ["fedprox", "scaffold"])
def test_an_agent_without_the_strategy_is_refused_at_join_and_the_token_is_kept(  # type: ignore[no-untyped-def]
        coordinator, admin: Admin, strategy: str) -> None:
    job = admin.create_job(make_spec() + f"aggregation: {{strategy: {strategy}}}\n")
    token = admin.token(job, uses=1)
    stub = pb_grpc.ClientServiceStub(grpc.insecure_channel(coordinator.address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(_join(token, []))  # an agent from before client-side strategies
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == (
        f"job {job} uses aggregation strategy {strategy}, which runs in the client's training loop; this client's "
        f"agent (fedtune 0.1.0) does not run '{strategy}': upgrade fedtune on this client")
    assert coordinator.coordinator.state.clients(job) == []
    stub.Join(_join(token, list(CLIENT_FEATURES)))  # the one use is still there
    assert len(coordinator.coordinator.state.clients(job)) == 1


def test_a_scaffold_update_without_or_with_a_bad_control_variate_is_refused(coordinator, admin: Admin) -> None:  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec() + "aggregation: {strategy: scaffold}\n")
    raw = RawClient.__new__(RawClient)
    raw.channel = grpc.insecure_channel(coordinator.address)
    raw.stub = pb_grpc.ClientServiceStub(raw.channel)
    raw.sign_key = Ed25519PrivateKey.generate()
    raw.client_id = raw.stub.Join(pb.JoinRequest(
        token=admin.token(job), sign_public_key=raw_public_bytes(raw.sign_key),
        kx_public_key=raw_public_bytes(X25519PrivateKey.generate()), features=list(CLIENT_FEATURES))).client_id
    task = raw.task()
    state = raw.global_state(task)
    delta = {k: torch.zeros_like(v) for k, v in state.items()}
    first = min(delta)
    cases = [
        (delta, "update has no SCAFFOLD control variate"),
        ({**delta, **{f"control/{k}": v.clone() for k, v in delta.items() if k != first}},
         f"control variate lacks tensor {first!r}"),
        ({**delta, **{f"control/{k}": v.clone() for k, v in delta.items()}, f"control/{first}": torch.zeros(3)},
         f"control variate tensor {first!r} has shape (3,)"),
    ]
    for i, (blob, message) in enumerate(cases):
        with pytest.raises(grpc.RpcError) as info:
            raw.send(task, tensors_to_bytes(blob), update_id=f"bad-{i}")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
    assert coordinator.coordinator.state.updates(job, 1) == []
    good = {**delta, **{f"control/{k}": v.clone() for k, v in delta.items()}}
    assert not raw.send(task, tensors_to_bytes(good), update_id="good").duplicate
    raw.channel.close()


def test_scaffold_variate_survives_a_client_restart(coordinator, admin: Admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With one enrolled client the server's variate after each round equals the client's own
    (c = Σ Δc_i = c_i), which holds across rounds only if the restarted agent read c_i back."""
    from fedtune.client.agent import ClientAgent
    from fedtune.client.channel import INSECURE
    from fedtune.data import load_jsonl

    clients, eval_file = fed_data
    job = admin.create_job(make_spec(eval_file, steps=6, rounds=2) + "aggregation: {strategy: scaffold}\n")
    token = admin.token(job)

    def agent() -> ClientAgent:
        return ClientAgent(coordinator.address, token, clients[0], tmp_path / "c0", INSECURE, device="cpu",
                           progress=False, examples=load_jsonl(clients[0]))

    co = coordinator.coordinator
    first = agent()
    first.run(max_tasks=1)  # one round, then the process "restarts"
    path = first._scaffold_path(job)
    from safetensors.torch import load_file

    def server_c(rnd: int) -> dict[str, torch.Tensor]:
        sha = co.state.strategy_state(job, rnd)
        assert sha, f"round {rnd} kept no SCAFFOLD state"
        return {k.removeprefix("c/"): v for k, v in bytes_to_tensors(co.store.read(sha)).items()}

    from tests.conftest import wait_until

    wait_until(lambda: co.state.strategy_state(job, 1), what="round 1's state")
    own1 = load_file(str(path))
    for k, v in server_c(1).items():
        assert torch.allclose(v.float(), own1[k], atol=1e-6)
    agent().run()
    own2 = load_file(str(path))
    assert any(not torch.equal(own1[k], own2[k]) for k in own1)
    for k, v in server_c(2).items():
        assert torch.allclose(v.float(), own2[k], atol=1e-5)


def test_fedprox_with_a_large_mu_keeps_the_local_adapter_near_the_global(tmp_path_factory, one_thread) -> None:  # type: ignore[no-untyped-def]
    from fedtune.methods import config_for
    from fedtune.models import load_causal_lm
    from fedtune.peft_io import adapter_state, build_peft_model, load_adapter_state
    from fedtune.strategies.local import FedProxObjective, begin
    from fedtune.training import train_adapter
    from tests.conftest import tiny_training_setup

    preset, pad, train, _ = tiny_training_setup(tmp_path_factory, 1, 48)
    model = build_peft_model(load_causal_lm(preset, torch.device("cpu")),
                             config=config_for({"method": "lora", "r": 4, "alpha": 8,
                                                "target_modules": ["q_proj", "v_proj"]}), seed=0)
    start = adapter_state(model)
    norms = {}
    for mu in (0.0, 1.0, 20.0):
        load_adapter_state(model, start)
        objective = FedProxObjective(mu)
        begin(objective, model)
        train_adapter(model, train, pad_id=pad, lr=0.01, batch_size=8, steps=15, epochs=None, seed=0,
                      device=torch.device("cpu"), progress=False, objective=objective)
        end = adapter_state(model)
        norms[mu] = sum(float((end[k] - start[k]).pow(2).sum()) for k in start) ** 0.5
    assert norms[20.0] < norms[1.0] < norms[0.0]
    assert norms[20.0] < 0.8 * norms[0.0]


def test_async_rounds_never_wait_for_a_slow_client_and_count_every_update_once(  # type: ignore[no-untyped-def]
        coordinator, admin: Admin, fed_data, tmp_path: Path) -> None:
    import threading
    import time

    from fedtune.client.agent import ClientAgent
    from fedtune.client.channel import INSECURE
    from fedtune.data import load_jsonl

    class Paced(ClientAgent):
        """A client whose every round takes ``pause`` seconds longer (the slow one 5x the others)."""

        pause = 0.0

        def _train(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            time.sleep(self.pause)
            return super()._train(*args, **kwargs)

    clients, eval_file = fed_data
    job = admin.create_job(make_spec(eval_file, steps=4, rounds=5, clients=3, min_clients=2)
                           + "aggregation: {mode: async, async: {buffer: 2}}\n")
    agents = []
    for i in range(3):
        a = Paced(coordinator.address, admin.token(job), clients[i], tmp_path / f"c{i}", INSECURE, device="cpu",
                  name=f"c{i}", progress=False, examples=load_jsonl(clients[i]))
        a.pause = 3.0 if i == 2 else 0.6
        agents.append(a)
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(timeout=240)
    status = admin.job(job)
    assert status.state == "finished", status.message
    state = coordinator.coordinator.state
    slow_id = agents[2]._client_id
    per_round = [state.updates(job, r) for r in range(1, 6)]
    assert all(len(u) >= 2 for u in per_round)
    ids = [u.update_id for ups in per_round for u in ups]
    assert len(ids) == len(set(ids))  # each update counted in exactly one version
    # The fast clients were never held back: each is in at least 4 of the 5 versions (a buffer closes
    # the moment its second update lands, so the slow client's stale update can push one fast
    # client's update to the next version, where it still counts); the slow one in fewer.
    for fast_id in (a._client_id for a in agents[:2]):
        assert sum(fast_id in {u.client_id for u in ups} for ups in per_round) >= 4
    slow_rounds = [r for r, ups in enumerate(per_round, 1) if slow_id in {u.client_id for u in ups}]
    assert 1 <= len(slow_rounds) < 5
    metrics = [json.loads(r.metrics_json) for r in status.history]
    assert sum(m["contributors"] for m in metrics) == len(ids)
    assert max(m["staleness_max"] for m in metrics) >= 1  # the slow client's update arrived versions late
    # Five versions took less than five of the slow client's rounds would.
    assert time.monotonic() - t0 < 5 * 3.0 + 30
    for t in threads[2:]:
        t.join(timeout=60)
