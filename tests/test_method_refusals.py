"""What a job spec or a client may not ask of a PEFT method: refused at creation with the reason,
or INVALID_ARGUMENT at upload, and nothing created or counted."""

from __future__ import annotations

import grpc
import pytest
import torch

from fedtune.errors import InvalidInput
from fedtune.methods import METHODS
from fedtune.peft_io import tensors_to_bytes
from fedtune.spec import parse_spec
from tests.conftest import Admin, make_spec, wait_until
from tests.test_rpc_contract import round_setup  # noqa: F401 - the fixture: a rank-4 LoRA job, one open round


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("peft: {method: loha, r: 0}", "job spec: peft.r: Input should be greater than 0"),
        ("peft: {method: loha, r: four}", "job spec: peft.r: Input should be a valid integer"),
        ("peft: {method: ia3, r: 4}", "job spec: peft.r: unknown key"),
        ("peft: {method: bottleneck, placement: diagonal}", "job spec: peft.placement: Input should be 'serial'"),
        # With target_modules left to the base family, the check runs at job creation (test_architectures).
        ("peft: {method: ia3, target_modules: [k_proj, down_proj], feedforward_modules: [up_proj]}",
         "feedforward_modules ['up_proj'] are not in target"),
        ("peft: {method: lora, rank_pattern: {o_proj: 0}}", "rank_pattern['o_proj'] must be in 1..1024"),
        ("peft: {method: adalora, init_r: 4, target_r: 8}", "target_r (8) is larger than init_r (4)"),
        ("peft: {method: adalora, tinit: 2, tfinal: 1}\nrounds: 3", "leave no round of the job's 3 to prune in"),
        ("peft: {method: p_tuning}", "job spec: peft.method: unknown PEFT method 'p_tuning'; known: "),
        ("mode: offsite\npeft: {method: prefix_tuning}",
         "peft.method prefix_tuning: prefix_tuning adds virtual tokens that every block attends to"),
        ("mode: offsite\npeft: {method: ia3}", "peft.method ia3 cannot be confined to offsite tuning's adapter blocks"),
        ("peft: {method: loha}\nclient_quantization: nf4", "peft cannot train loha on a bitsandbytes-quantized base"),
        ("peft: {method: ia3}\naggregation: {lora: ffa}", "aggregation.lora ffa is for peft.method lora, not ia3"),
        ("aggregation: {lora: exact}\nsecure_aggregation: {}\nmin_clients: 3\nclients_per_round: 3",
         "aggregation.lora exact is not a sum of what clients send"),
        ("aggregation: {lora: fedsa}\nsecure_aggregation: {}\nmin_clients: 3\nclients_per_round: 3",
         "aggregation.lora fedsa is not a sum of what clients send"),
        ("aggregation: {lora: exact}\nprivacy: {}", "aggregation.lora exact re-factors the mean product by SVD"),
        ("peft: {method: lora, use_dora: true}\naggregation: {lora: exact}", "DoRA normalises it"),
        ("peft: {method: lora, rank_pattern: {o_proj: 2}}\naggregation: {lora: exact}",
         "with a rank_pattern use factors or ffa"),
    ],
)
def test_method_specs_that_cannot_work_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_spec(text)
    assert message in str(info.value)


def test_what_secure_aggregation_and_offsite_accept() -> None:
    secure = "\nsecure_aggregation: {}\nmin_clients: 3\nclients_per_round: 3"
    assert parse_spec("aggregation: {lora: ffa}" + secure).aggregation.lora == "ffa"
    for name in METHODS:  # every method's update is a sum of tensors under FedAvg
        assert parse_spec(f"peft: {{method: {name}}}" + secure).peft.method == name
    for name in ("lora", "adalora", "loha", "lokr", "vera", "bitfit", "bottleneck"):
        assert parse_spec(f"mode: offsite\npeft: {{method: {name}}}").peft.method == name


def _refused(admin: Admin, spec: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        admin.create_job(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value.details())


def test_create_refuses_targets_the_base_lacks_and_prompts_that_do_not_fit(coordinator, admin: Admin) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec()
    base = spec.replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
                        "peft: {method: loha, target_modules: [c_attn]}")
    assert "peft.target_modules ['c_attn']: cannot add LOHA to the base model" in _refused(admin, base)
    prompt = spec.replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
                          "peft: {method: prompt_tuning, num_virtual_tokens: 4000}")
    assert "peft.num_virtual_tokens (4000) plus training.max_seq_len (48) is more than the base's" in \
        _refused(admin, prompt)
    assert coordinator.coordinator.state.jobs() == []


def _cut(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: (v[:rank] if ".lora_A." in k else v[:, :rank]).clone() * 0 + 0.01 for k, v in state.items()}


def test_updates_of_another_rank_or_method_are_invalid_and_not_counted(round_setup) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    running, job, c1, c2, t1, t2 = round_setup
    state = running.coordinator.state
    g = c1.global_state(t1)

    def code(tensors: dict[str, torch.Tensor], **metrics: float) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            c1.send(t1, tensors_to_bytes(tensors), update_id="bad", metrics={"train_loss": 1.0, **metrics})
        return info.value.code(), str(info.value.details())

    # Rank 2 tensors that declare rank 4 (the job's, by default), and the other way round.
    assert code(_cut(g, 2))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code({k: torch.zeros_like(v) for k, v in g.items()}, lora_rank=2.0)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # A rank above the job's, or not a whole number.
    status, details = code(g, lora_rank=8.0)
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "the job's rank is 4" in details
    assert code(g, lora_rank=2.5)[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Another method's tensors (IA3 vectors where LoRA factors belong).
    ia3 = {k.replace(".lora_A.weight", ".ia3_l"): torch.ones(1, v.shape[1]) for k, v in g.items() if ".lora_A." in k}
    assert code(ia3)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert state.updates(job, t1.round) == []

    # A rank-2 update that says so is accepted, and the round aggregates it zero-padded.
    c1.send(t1, tensors_to_bytes(_cut(g, 2)), metrics={"train_loss": 1.0, "lora_rank": 2.0})
    c2.send(t2, tensors_to_bytes({k: torch.full_like(v, 0.01) for k, v in g.items()}), update_id="u2")
    wait_until(lambda: state.job(job).state == "finished", what="the round to publish")
    new = running.coordinator.store.read(state.round(job, 1).global_out)
    from fedtune.peft_io import bytes_to_tensors

    out = bytes_to_tensors(new)
    for k, v in g.items():
        if ".lora_A." in k:  # rows above rank 2 only got the rank-4 client's half
            torch.testing.assert_close(out[k][:2], v[:2] + 0.01)
            torch.testing.assert_close(out[k][2:], v[2:] + 0.005)
