"""Every PEFT method of the registry federated end to end, and the LoRA aggregation modes.

Real coordinator (gRPC on a loopback port, SQLite), real client agent processes, real peft: each
job must lower the eval loss, publish an adapter that plain peft loads (after ``import fedtune``
for fedtune's own tuners), and that adapter must compute what the coordinator's aggregate does
when applied by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.methods import METHODS, config_for
from fedtune.methods.lora_aggregation import product_mean, truncate_rank
from fedtune.peft_io import build_peft_model, bytes_to_tensors, load_adapter_state
from tests.conftest import make_spec, run_agents

# Small options per method so that 2 rounds of 3 clients finish in seconds on the tiny preset.
OPTIONS = {
    "lora": "{method: lora, r: 4, alpha: 8, use_rslora: true}",
    "adalora": "{method: adalora, init_r: 6, target_r: 2, alpha: 8}",
    "loha": "{method: loha, r: 4, alpha: 4}",
    "lokr": "{method: lokr, r: 4, alpha: 4}",
    "vera": "{method: vera, r: 16, d_initial: 0.5}",
    "ia3": "{method: ia3}",
    "ln_tuning": "{method: ln_tuning}",
    "prompt_tuning": "{method: prompt_tuning, num_virtual_tokens: 4}",
    "prefix_tuning": "{method: prefix_tuning, num_virtual_tokens: 4}",
    "bitfit": "{method: bitfit}",
    "bottleneck": "{method: bottleneck, bottleneck_size: 8, placement: serial}",
}


def method_spec(eval_file: Path, peft: str, *, rounds: int = 2, clients: int = 3, lr: float = 0.02,
                extra: str = "") -> str:
    spec = make_spec(eval_file, steps=6, rounds=rounds, clients=clients)
    spec = spec.replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", f"peft: {peft}")
    return spec.replace("lr: 0.01", f"lr: {lr}") + extra


def run_agent_threads(coordinator, admin, job: str, data: list[Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real client agent, one per data file, in threads of this process (over real gRPC to the
    coordinator): the method sweep pays the agents' imports once instead of once per process. The
    aggregation-mode tests below run agents as separate processes."""
    import threading

    from fedtune.client.agent import ClientAgent
    from fedtune.client.channel import INSECURE
    from fedtune.data import load_jsonl

    agents = [ClientAgent(coordinator.address, admin.token(job), path, tmp_path / f"c{i}", INSECURE, device="cpu",
                          name=f"c{i}", progress=False, examples=load_jsonl(path)) for i, path in enumerate(data)]
    errors: list[BaseException] = []

    def run(agent: ClientAgent) -> None:
        try:
            agent.run()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "an agent did not finish"
    if errors:
        raise errors[0]


def test_every_registered_method_has_a_federated_test() -> None:
    assert set(OPTIONS) == set(METHODS)


def _published(coordinator, job: str, rnd: int) -> Path:  # type: ignore[no-untyped-def]
    return coordinator.coordinator.adapters_root / job / f"round-{rnd}"


def _hand_applied_logits(coordinator, job: str, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The coordinator's last global adapter, put into a fresh model by hand (fedtune's own path)."""
    from fedtune.models import load_causal_lm

    service = coordinator.coordinator
    state = service.state
    last = state.rounds(job)[-1]
    spec = service.spec(job)
    model = build_peft_model(load_causal_lm(service.base_dir(state.job(job)), torch.device("cpu")),
                             config=config_for(spec.peft.model_dump()))
    load_adapter_state(model, bytes_to_tensors(service.store.read(last.global_out)))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _peft_loaded_logits(coordinator, job: str, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The published directory loaded by plain peft, as a consumer does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    service = coordinator.coordinator
    rnd = service.state.rounds(job)[-1].round
    base = AutoModelForCausalLM.from_pretrained(service.base_dir(service.state.job(job)))
    model = PeftModel.from_pretrained(base, _published(coordinator, job, rnd)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.integration
@pytest.mark.parametrize("method", list(OPTIONS))
def test_method_federates_lowers_eval_loss_and_publishes_what_peft_loads(  # type: ignore[no-untyped-def]
        method: str, coordinator, admin, fed_data, tmp_path: Path) -> None:
    clients, eval_file = fed_data
    job = admin.create_job(method_spec(eval_file, OPTIONS[method]))
    run_agent_threads(coordinator, admin, job, clients[:3], tmp_path)
    state = coordinator.coordinator.state
    assert state.job(job).state == "finished", state.job(job).message
    rounds = state.rounds(job)
    assert [r.metrics["contributors"] for r in rounds] == [3.0, 3.0]
    base_loss = json.loads(state.job(job).base_eval_json)["eval_loss"]
    assert rounds[-1].metrics["eval_loss"] < base_loss, (rounds[-1].metrics, base_loss)
    published = _published(coordinator, job, rounds[-1].round)
    config = json.loads((published / "adapter_config.json").read_text())
    assert config["peft_type"].lower() == method
    from fedtune.adapters import verify_adapter_dir

    manifest = verify_adapter_dir(published)  # signature and file hashes, as `adapters verify` checks
    assert manifest["peft"]["method"] == method
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_peft_loaded_logits(coordinator, job, ids), _hand_applied_logits(coordinator, job, ids),
                               rtol=1e-5, atol=1e-5)


def _client_products(coordinator, job: str, rnd) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:  # type: ignore[no-untyped-def]
    """(the round's global-in adapter, each client's end-of-round adapter) from the stored updates."""
    from fedtune.coordinator.compute import client_states, decode_updates
    from fedtune.crypto.envelope import UpdateBinding
    from fedtune.methods.lora import LoraAggregation, declared_rank

    service = coordinator.coordinator
    spec = service.spec(job)
    updates = service.state.updates(job, rnd.round)
    plains = [service.keys.open_update(service.store.read(u.sha256),
                                       UpdateBinding(u.job_id, u.round, u.client_id, u.update_id)) for u in updates]
    global_in = service.store.read(rnd.global_in)
    schema = {k: tuple(v.shape) for k, v in bytes_to_tensors(global_in).items()}
    lora = LoraAggregation(spec.aggregation.lora, spec.peft.r,
                           tuple(declared_rank(u.metrics, spec.peft.r) for u in updates))
    states = client_states(bytes_to_tensors(global_in), decode_updates(plains, spec.codec, schema, lora)[0], lora)
    return bytes_to_tensors(global_in), states, [u.num_examples for u in updates]  # type: ignore[return-value]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["exact", "ffa"])
def test_exact_and_ffa_publish_the_weighted_mean_of_the_clients_products(  # type: ignore[no-untyped-def]
        mode: str, coordinator, admin, fed_data, tmp_path: Path) -> None:
    clients, eval_file = fed_data
    # exact: clients at rank 4 under a job of rank 12, so the sum of their products fits the job's
    # rank and nothing is truncated: the published product must be the mean itself.
    rank = 12 if mode == "exact" else 4
    job = admin.create_job(method_spec(eval_file, f"{{method: lora, r: {rank}, alpha: {2 * rank}}}", rounds=2,
                                       extra=f"aggregation: {{lora: {mode}}}\n"))
    run_agents(coordinator, admin, job, clients[:3], tmp_path,
               extra=[["--max-rank", "4"]] * 3 if mode == "exact" else None)
    service = coordinator.coordinator
    assert service.state.job(job).state == "finished", service.state.job(job).message
    base_loss = json.loads(service.state.job(job).base_eval_json)["eval_loss"]
    for rnd in service.state.rounds(job):
        start, states, weights = _client_products(coordinator, job, rnd)
        want = product_mean(states, [float(w) for w in weights])
        out = bytes_to_tensors(service.store.read(rnd.global_out))
        for module, product in want.items():
            a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            got = out[b].double() @ out[a].double()
            torch.testing.assert_close(got, product, rtol=1e-5, atol=1e-5)
            if mode == "ffa":  # A never moves from its shared init
                assert torch.equal(out[a], start[a])
        assert rnd.metrics["lora_product_error"] < 1e-5
        if mode == "ffa":
            # Only B travels: half of a LoRA pair's bytes (A and B have the same size here).
            assert all(not k.endswith("lora_A.weight") for u in service.state.updates(job, rnd.round)
                       for k in _wire_tensors(coordinator, u))
    assert service.state.rounds(job)[-1].metrics["eval_loss"] < base_loss


def _wire_tensors(coordinator, u) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """An accepted update as its client sent it (opened, not decoded)."""
    from fedtune.crypto.envelope import UpdateBinding

    service = coordinator.coordinator
    plain = service.keys.open_update(service.store.read(u.sha256), UpdateBinding(u.job_id, u.round, u.client_id,
                                                                                 u.update_id))
    return bytes_to_tensors(plain)


@pytest.mark.integration
def test_clients_of_ranks_2_4_and_8_train_one_exact_job(coordinator, admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    job = admin.create_job(method_spec(eval_file, "{method: lora, r: 8, alpha: 16}", rounds=2,
                                       extra="aggregation: {lora: exact}\n"))
    run_agents(coordinator, admin, job, clients[:3], tmp_path,
               extra=[["--max-rank", "2"], ["--max-rank", "4"], []])
    service = coordinator.coordinator
    assert service.state.job(job).state == "finished", service.state.job(job).message
    rounds = service.state.rounds(job)
    for rnd in rounds:
        ranks = sorted(u.metrics["lora_rank"] for u in service.state.updates(job, rnd.round))
        assert ranks == [2.0, 4.0, 8.0]
        # Each client's update travelled at its own rank (fewer bytes from the smaller clients).
        for u in service.state.updates(job, rnd.round):
            wire = _wire_tensors(coordinator, u)
            assert {v.shape[0] for k, v in wire.items() if k.endswith("lora_A.weight")} == {u.metrics["lora_rank"]}
        _, states, _ = _client_products(coordinator, job, rnd)
        assert sorted(s[next(k for k in s if k.endswith("lora_A.weight"))].shape[0] for s in states) == [2, 4, 8]
        assert 0 <= rnd.metrics["lora_product_error"] < 1
    out = bytes_to_tensors(service.store.read(rounds[-1].global_out))
    # The published adapter is plain LoRA at the job's rank.
    assert {v.shape[0] for k, v in out.items() if k.endswith("lora_A.weight")} == {8}
    # A rank-2 client starts from the best rank-2 approximation of the global adapter.
    cut = truncate_rank(out, 2)
    assert {v.shape[0] for k, v in cut.items() if k.endswith("lora_A.weight")} == {2}
    assert rounds[-1].metrics["eval_loss"] < json.loads(service.state.job(job).base_eval_json)["eval_loss"]


@pytest.mark.integration
@pytest.mark.parametrize("peft", ["{method: lora, r: 4, alpha: 8}\naggregation: {lora: ffa}", "{method: ia3}"])
def test_secure_aggregation_of_ffa_with_a_lower_rank_client_and_of_another_method(  # type: ignore[no-untyped-def]
        peft: str, coordinator, admin, fed_data, tmp_path: Path) -> None:
    clients, eval_file = fed_data
    spec = method_spec(eval_file, peft, rounds=2, lr=0.03) + (
        "secure_aggregation: {degree: 2, threshold: 2, clip: 0.5, phase_seconds: 30}\n")
    job = admin.create_job(spec)
    ffa = "ffa" in peft
    run_agents(coordinator, admin, job, clients[:3], tmp_path, extra=[["--max-rank", "2"], [], []] if ffa else None)
    service = coordinator.coordinator
    assert service.state.job(job).state == "finished", service.state.job(job).message
    rounds = service.state.rounds(job)
    assert [r.metrics["contributors"] for r in rounds] == [3.0, 3.0]
    assert all(u.codec == "secagg" for u in service.state.updates(job, 2))
    assert rounds[-1].metrics["eval_loss"] < json.loads(service.state.job(job).base_eval_json)["eval_loss"]
    if ffa:  # A is never touched: it is not even in the masked vector
        first = bytes_to_tensors(service.store.read(rounds[0].global_in))
        last = bytes_to_tensors(service.store.read(rounds[-1].global_out))
        for k, v in first.items():
            if ".lora_A." in k:
                assert torch.equal(last[k], v)
            else:
                assert not torch.equal(last[k], v)


@pytest.mark.integration
def test_adalora_budget_prunes_round_by_round_and_pruned_components_stay_zero(  # type: ignore[no-untyped-def]
        coordinator, admin, fed_data, tmp_path: Path) -> None:
    from fedtune.methods.adalora import AdaloraOptions, round_budget

    clients, eval_file = fed_data
    job = admin.create_job(method_spec(eval_file, "{method: adalora, init_r: 6, target_r: 2, alpha: 8}", rounds=3))
    run_agents(coordinator, admin, job, clients[:3], tmp_path)
    service = coordinator.coordinator
    assert service.state.job(job).state == "finished", service.state.job(job).message
    rounds = service.state.rounds(job)
    opts = AdaloraOptions(init_r=6, target_r=2, alpha=8)
    modules = 4  # q_proj and v_proj of 2 blocks
    want = [round_budget(opts, modules, r.round, 3) for r in rounds]
    assert want[0] > want[1] > want[2] == 2 * modules  # cubic: from 24 down to 8 components
    for rnd, budget in zip(rounds, want, strict=True):
        out = bytes_to_tensors(service.store.read(rnd.global_out))
        kept = sum(int((v != 0).sum()) for k, v in out.items() if k.endswith(".lora_E"))
        assert kept == budget == rnd.metrics["adalora_components"]
        # A pruned component is zero whole: its P row and Q column too.
        for key, e in out.items():
            if key.endswith(".lora_E"):
                dead = (e.reshape(-1) == 0)
                module = key[: -len(".lora_E")]
                assert torch.all(out[f"{module}.lora_A"][dead] == 0)
                assert torch.all(out[f"{module}.lora_B"][:, dead] == 0)
    # Pruned components stay pruned: the clients' next-round updates leave them at zero.
    first = bytes_to_tensors(service.store.read(rounds[0].global_out))
    for u in service.state.updates(job, 2):
        delta = _wire_tensors(coordinator, u)
        for key, e in first.items():
            if key.endswith(".lora_E"):
                dead = e.reshape(-1) == 0
                assert torch.all(delta[key].reshape(-1)[dead] == 0)


@pytest.mark.integration
def test_fedsa_clients_keep_their_own_b_and_take_the_global_a(coordinator, admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    clients, eval_file = fed_data
    job = admin.create_job(method_spec(eval_file, "{method: lora, r: 4, alpha: 8}", rounds=2,
                                       extra="aggregation: {lora: fedsa}\n"))
    run_agents(coordinator, admin, job, clients[:3], tmp_path)
    service = coordinator.coordinator
    assert service.state.job(job).state == "finished", service.state.job(job).message
    r1, r2 = service.state.rounds(job)
    g1, g2 = (bytes_to_tensors(service.store.read(r.global_in)) for r in (r1, r2))
    for i in range(3):
        (personal,) = (tmp_path / f"c{i}" / "personal").glob("*.safetensors")
        client_id = personal.stem
        (u1,) = [u for u in service.state.updates(job, 1) if u.client_id == client_id]
        (u2,) = [u for u in service.state.updates(job, 2) if u.client_id == client_id]
        d1, d2 = _wire_tensors(coordinator, u1), _wire_tensors(coordinator, u2)
        own = load_file(str(personal))
        assert own and all(".lora_B." in k for k in own)
        assert len(d1) == len(g1)  # both A and B travel
        for k, b in own.items():
            # What the client keeps is the B it trained; its delta is against the global B, so the
            # coordinator's mean is the mean of the clients' own B.
            torch.testing.assert_close(b, g2[k] + d2[k], rtol=1e-5, atol=1e-6)
            # Its own round-1 B, not the average that became round 2's global B.
            assert not torch.allclose(g1[k] + d1[k], g2[k])
    assert r2.metrics["lora_product_error"] > 0  # fedsa's consensus is not the exact mean product


def test_fedsa_client_starts_from_its_own_b_and_sends_deltas_against_the_global(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fedtune.methods.client_plan import client_plan

    personal = tmp_path / "personal" / "c.safetensors"
    plan = client_plan({"method": "lora", "r": 2, "lora_aggregation": "fedsa"}, None, personal)
    g = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}
    assert torch.equal(plan.start(g)["m.lora_B.weight"], g["m.lora_B.weight"])  # no own B yet
    own = torch.full((4, 2), 0.5)
    personal.parent.mkdir()
    save_file({"m.lora_B.weight": own}, str(personal))
    start = plan.start(g)
    assert torch.equal(start["m.lora_B.weight"], own) and torch.equal(start["m.lora_A.weight"], g["m.lora_A.weight"])
    trained = {"m.lora_A.weight": g["m.lora_A.weight"] + 0.1, "m.lora_B.weight": own + 0.2}
    delta = plan.delta(trained, g, pad=False)
    torch.testing.assert_close(delta["m.lora_B.weight"], own + 0.2)  # against the global B (zeros)
    plan.finish(trained)
    assert plan.start(g)["m.lora_B.weight"].equal(own + 0.2)  # kept for the next round, on disk
