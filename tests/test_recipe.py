"""The training recipe (accumulation, schedule, checkpointing, precision, OOM retry) and bases that
clients already hold (--base-dir: checked file by file, never downloaded)."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedtune.client.agent import ClientAgent
from fedtune.client.channel import INSECURE
from fedtune.client.local_base import BaseFile, verified_base
from fedtune.data import load_jsonl
from fedtune.errors import InvalidInput
from fedtune.hashing import file_sha256, loadable_files
from fedtune.methods import config_for
from fedtune.peft_io import adapter_state, build_peft_model
from fedtune.spec import parse_spec
from fedtune.training import Recipe, recipe_from_training, resolve_precision, train_adapter
from tests.conftest import make_spec, tiny_training_setup

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, one_thread):  # type: ignore[no-untyped-def]
    return tiny_training_setup(tmp_path_factory, n_clients=2, max_seq_len=48)


def _model(preset: Path, dropout: float = 0.0):  # type: ignore[no-untyped-def]
    from fedtune.models import load_causal_lm

    cfg = {"method": "lora", "r": 4, "alpha": 8, "dropout": dropout, "target_modules": ["q_proj", "v_proj"]}
    return build_peft_model(load_causal_lm(preset, CPU), config=config_for(cfg), seed=3)


def _grads(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _one_step(setup, recipe: Recipe, dropout: float = 0.0) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    preset, pad_id, train, _ = setup
    model = _model(preset, dropout)
    # The gradients of the (only) step stay on the parameters after the run.
    train_adapter(model, train, pad_id=pad_id, lr=1e-3, batch_size=8, steps=1, epochs=None, seed=5, device=CPU,
                  progress=False, recipe=recipe)
    return _grads(model)


def test_accumulating_micro_batches_of_two_equals_one_batch_of_eight(setup) -> None:  # type: ignore[no-untyped-def]
    whole = _one_step(setup, Recipe(max_grad_norm=None))
    accumulated = _one_step(setup, Recipe(micro_batch=2, max_grad_norm=None))
    assert whole.keys() == accumulated.keys() and whole
    assert any(g.abs().sum() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(setup) -> None:  # type: ignore[no-untyped-def]
    # Dropout on: checkpointing must replay the same masks in its recomputation.
    plain = _one_step(setup, Recipe(), dropout=0.1)
    checkpointed = _one_step(setup, Recipe(gradient_checkpointing=True), dropout=0.1)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def _lrs_of_run(setup, recipe: Recipe, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    preset, pad_id, train, _ = setup
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        train_adapter(_model(preset), train, pad_id=pad_id, lr=0.01, batch_size=4, steps=steps, epochs=None, seed=0,
                      device=CPU, progress=False, recipe=recipe)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_learning_rate_follows_its_formula_across_rounds_by_global_step(setup, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    steps, rounds, warmup = 4, 3, 3
    training = {"batch_size": 4, "rounds": rounds, "lr_scheduler": scheduler, "warmup_steps": warmup,
                "precision": "fp32"}
    lrs = []
    for rnd in range(1, rounds + 1):
        recipe = recipe_from_training(training, round_no=rnd, steps=steps, device=CPU)
        assert recipe.first_step == (rnd - 1) * steps and recipe.total_steps == rounds * steps
        lrs += _lrs_of_run(setup, recipe, steps)
    total = steps * rounds

    def expected(g: int) -> float:
        if g < warmup:
            return 0.01 * (g + 1) / warmup
        p = (g - warmup) / (total - warmup)
        return 0.01 * {"constant": 1.0, "linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p))}[scheduler]

    assert lrs == pytest.approx([expected(g) for g in range(total)], rel=1e-9)


def test_warmup_ratio_is_a_share_of_the_whole_job() -> None:
    recipe = recipe_from_training({"batch_size": 8, "rounds": 10, "warmup_ratio": 0.05}, round_no=1, steps=20,
                                  device=CPU)
    assert recipe.warmup_steps == 10  # 5% of 200 global steps


def test_bf16_autocast_on_cpu_trains_close_to_fp32(setup) -> None:  # type: ignore[no-untyped-def]
    preset, pad_id, train, _ = setup
    losses = {}
    for precision in ("fp32", "bf16"):
        result = train_adapter(_model(preset), train, pad_id=pad_id, lr=0.01, batch_size=8, steps=4, epochs=None,
                               seed=0, device=CPU, progress=False, recipe=Recipe(precision=precision))
        losses[precision] = result.mean_loss
    assert math.isfinite(losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_precisions_a_device_cannot_run_are_refused_with_the_reason() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(InvalidInput, match="precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


def test_micro_batch_must_divide_the_batch() -> None:
    with pytest.raises(InvalidInput, match="--micro-batch 3 does not divide the job's batch_size 8"):
        recipe_from_training({"batch_size": 8}, round_no=1, steps=4, device=CPU, micro_batch=3)
    # The job's own split: batch_size / gradient_accumulation_steps.
    assert recipe_from_training({"batch_size": 8, "gradient_accumulation_steps": 4}, round_no=1, steps=4,
                                device=CPU).micro_batch == 2


def test_spec_refuses_an_accumulation_that_does_not_divide_the_batch() -> None:
    with pytest.raises(InvalidInput, match="gradient_accumulation_steps \\(3\\) must divide batch_size \\(8\\)"):
        parse_spec("training: {batch_size: 8, gradient_accumulation_steps: 3}")
    with pytest.raises(InvalidInput, match="set only one of training.warmup_steps and training.warmup_ratio"):
        parse_spec("training: {warmup_steps: 2, warmup_ratio: 0.1}")


def test_out_of_memory_halves_the_micro_batch_and_retries_once(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A device that cannot hold more than 2 rows per pass: the first try at 8 fails, the retry at 4
    fails too, and the client stops with a clear error; a limit of 4 is met by the retry."""
    preset, pad_id, train, _ = setup
    from fedtune.client.agent import Prepared
    from fedtune.protos import fedtune_pb2 as pb

    training = {"batch_size": 8, "steps": 2, "lr": 0.01, "rounds": 1, "precision": "fp32", "seed": 0}
    cfg = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    prepared = Prepared("h", preset, train, pad_id, training, cfg)
    agent = ClientAgent("127.0.0.1:1", None, tmp_path / "d.jsonl", tmp_path / "c", INSECURE, device="cpu",
                        progress=False)
    model = agent._peft_model(prepared)
    global_state = {k: v.clone() for k, v in adapter_state(model).items()}
    rows_seen: list[int] = []
    limit = {"rows": 4}

    def guard(_module, args, kwargs):  # type: ignore[no-untyped-def]
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows_seen.append(ids.shape[0])
        if ids.shape[0] > limit["rows"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = model.get_base_model().model.register_forward_pre_hook(guard, with_kwargs=True)
    try:
        result, _, _ = agent._train(prepared, global_state, pb.Task(round=1))
        assert result.steps == 2 and rows_seen[0] == 8 and set(rows_seen[1:]) == {4}
        limit["rows"] = 2
        rows_seen.clear()
        from fedtune.errors import LimitExceeded

        with pytest.raises(LimitExceeded, match="out of memory on cpu at micro-batch 4; pass a smaller --micro-batch"):
            agent._train(prepared, global_state, pb.Task(round=1))
        assert rows_seen == [8, 4]
    finally:
        handle.remove()


# --------------------------------------------------------------------------- bases clients already hold
def test_only_the_files_loading_needs_travel(tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pytorch_model.bin", "README.md",
                 "LICENSE", "chat_template.jinja", "pytorch_model.bin.index.json", "tf_model.h5"):
        (tmp_path / name).write_text("x")
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "consolidated.00.pth").write_text("x")
    assert [p.name for p in loadable_files(tmp_path)] == ["chat_template.jinja", "config.json", "model.safetensors",
                                                          "tokenizer.json"]
    (tmp_path / "model.safetensors").unlink()
    assert "pytorch_model.bin" in [p.name for p in loadable_files(tmp_path)]


def _files(d: Path) -> list[BaseFile]:
    return [BaseFile(p.name, file_sha256(p), p.stat().st_size) for p in loadable_files(d)]


def test_a_hub_cache_is_searched_and_a_tampered_copy_is_named(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    preset = setup[0]
    files = _files(preset)
    cache = tmp_path / "hub"
    for name, tamper in (("models--acme--other", True), ("models--acme--tiny", False)):
        snap = cache / name / "snapshots" / "abc123"
        shutil.copytree(preset, snap)
        if tamper:
            (snap / "tokenizer.json").write_text((snap / "tokenizer.json").read_text() + " ")
    out = verified_base(cache, files, tmp_path / "linked", tmp_path / "memo.json")
    assert sorted(p.name for p in out.iterdir()) == sorted(f.path for f in files)
    assert all((out / f.path).resolve().parent == cache / "models--acme--tiny" / "snapshots" / "abc123"
               for f in files)
    shutil.rmtree(cache / "models--acme--tiny")
    with pytest.raises(InvalidInput, match=r"models--acme--other/snapshots/abc123 is not the job's base: "
                                           r"tokenizer.json has \d+ bytes"):
        verified_base(cache, files, tmp_path / "linked", tmp_path / "memo.json")


def test_a_same_size_edit_is_caught_by_its_hash_not_the_memo(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "copy"
    shutil.copytree(setup[0], copy)
    files = _files(copy)
    verified_base(copy, files, tmp_path / "linked", tmp_path / "memo.json")
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(InvalidInput, match="model.safetensors differs from the job's"):
        verified_base(copy, files, tmp_path / "linked", tmp_path / "memo.json")


def _run(agent: ClientAgent, errors: list[BaseException]) -> None:
    try:
        agent.run()
    except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
        errors.append(e)


@pytest.mark.integration
def test_a_client_with_its_own_base_downloads_no_base_bytes_and_a_tampered_one_trains_nothing(  # type: ignore[no-untyped-def]
        coordinator, admin, fed_data, tmp_path: Path, one_thread) -> None:
    clients, eval_file = fed_data
    recipe = ("training: {steps: 4, lr: 0.01, batch_size: 8, max_seq_len: 48, gradient_accumulation_steps: 2, "
              "lr_scheduler: cosine, warmup_ratio: 0.25, weight_decay: 0.0, precision: auto}\n")
    spec = make_spec(eval_file, rounds=2, clients=2)
    spec = "\n".join(line for line in spec.splitlines() if not line.startswith("training:")) + "\n" + recipe
    job = admin.create_job(spec)
    service = coordinator.coordinator
    base_dir = service.base_dir(service.state.job(job))
    own = tmp_path / "own-copy"
    shutil.copytree(base_dir, own)
    (own / "pytorch_model.bin").write_bytes(b"a duplicate the coordinator never sends")

    tampered = tmp_path / "tampered"
    shutil.copytree(base_dir, tampered)
    (tampered / "config.json").write_text(json.dumps({**json.loads((tampered / "config.json").read_text()),
                                                      "rms_norm_eps": 1e-3}))
    # A job of its own, one client per round, so that the refused client holds no one else's round.
    lone = admin.create_job(make_spec(eval_file, rounds=1, clients=1))
    bad = ClientAgent(coordinator.address, admin.token(lone), clients[2], tmp_path / "bad", INSECURE, device="cpu",
                      name="bad", progress=False, examples=load_jsonl(clients[2]), base_dir=tampered)
    with pytest.raises(InvalidInput, match=r"tampered is not the job's base: config.json has \d+ bytes, the job's "
                                           r"has \d+.*nothing was trained"):
        bad.run()
    assert bad.stats.bytes_down == 0 and bad.stats.rounds == []
    assert bad._client_id and not service.state.has_update(lone, 1, bad._client_id)

    agents = [ClientAgent(coordinator.address, admin.token(job), clients[0], tmp_path / "c0", INSECURE, device="cpu",
                          name="own", progress=False, examples=load_jsonl(clients[0]), base_dir=own, micro_batch=2),
              ClientAgent(coordinator.address, admin.token(job), clients[1], tmp_path / "c1", INSECURE, device="cpu",
                          name="fetch", progress=False, examples=load_jsonl(clients[1]))]
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_run, args=(a, errors), daemon=True) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert service.state.job(job).state == "finished", service.state.job(job).message
    own_agent, fetching = agents
    assert own_agent.stats.rounds == fetching.stats.rounds == [1, 2]
    base_bytes = sum(f.size for f in service.state.job_files(job))
    # Both fetched the same global adapters; only the fetching client also fetched the base.
    assert fetching.stats.bytes_down - own_agent.stats.bytes_down == base_bytes
    assert {f.path for f in service.state.job_files(job)} == {p.name for p in loadable_files(base_dir)}
    assert "pytorch_model.bin" not in {p.name for p in (tmp_path / "c0" / "models").rglob("*")}
    rounds = service.state.rounds(job)
    assert [r.metrics["contributors"] for r in rounds] == [2.0, 2.0]
    assert rounds[-1].metrics["eval_loss"] < json.loads(service.state.job(job).base_eval_json)["eval_loss"]


def test_a_client_quantizes_the_base_only_where_the_job_allows_it(tmp_path: Path) -> None:
    def agent(quantize: str | None) -> ClientAgent:
        return ClientAgent("127.0.0.1:1", None, tmp_path / "d.jsonl", tmp_path / "c", INSECURE, device="cpu",
                           progress=False, quantize=quantize)

    assert agent("nf4")._quantization({"client_quantization": "allowed"}) == "nf4"
    assert agent(None)._quantization({"client_quantization": "allowed"}) is None
    assert agent(None)._quantization({"client_quantization": "int8"}) == "int8"
    assert agent("int8")._quantization({"client_quantization": "int8"}) == "int8"
    with pytest.raises(InvalidInput, match="--quantize nf4: this job does not let clients quantize the base"):
        agent("nf4")._quantization({"client_quantization": None})
    with pytest.raises(InvalidInput, match="--quantize nf4: this job loads the base in int8; drop --quantize"):
        agent("nf4")._quantization({"client_quantization": "int8"})
    with pytest.raises(InvalidInput, match="--device must be auto, cpu, cuda or cuda:N"):
        ClientAgent("127.0.0.1:1", None, tmp_path / "d.jsonl", tmp_path / "c", INSECURE, device="gpu")


def test_client_quantization_allowed_is_refused_for_methods_peft_cannot_train_quantized() -> None:
    with pytest.raises(InvalidInput, match="client_quantization allowed: peft cannot train loha"):
        parse_spec("client_quantization: allowed\npeft: {method: loha}")


def test_packed_rows_train_with_the_loss_of_their_examples_apart(setup) -> None:  # type: ignore[no-untyped-def]
    """The training loss of a packed batch is the summed loss of its examples run one by one (no
    attention across examples, even with the model's use_cache on), and the client's weight in the
    average is its examples, not its rows."""
    from fedtune.data import TokenizedData, collate, pack
    from fedtune.training import _token_loss_sum

    preset, pad_id, train, _ = setup
    items = train[:12]
    rows = pack(items, 96)
    assert len(rows) < len(items)
    model = _model(preset).eval()
    assert model.config.use_cache
    with torch.no_grad():
        packed, n_packed = _token_loss_sum(model, collate(rows, pad_id))
        apart = [_token_loss_sum(model, collate([item], pad_id)) for item in items]
    assert n_packed == sum(n for _, n in apart)
    assert packed.item() == pytest.approx(sum(loss.item() for loss, _ in apart), rel=1e-5)
    result = train_adapter(_model(preset), TokenizedData(rows, examples=len(items)), pad_id=pad_id, lr=0.01,
                           batch_size=2, steps=2, epochs=None, seed=0, device=CPU, progress=False)
    assert result.num_examples == len(items) and math.isfinite(result.mean_loss)
