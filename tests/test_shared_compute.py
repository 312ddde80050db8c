"""One compute process per base: several jobs' evaluations in one batched pass equal their own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedtune.cluster.shared_compute import EvalBatcher, batchable
from fedtune.coordinator.evaluator import Evaluator
from fedtune.coordinator.state import Job
from fedtune.models import TINY_PRESET, load_causal_lm, materialize_preset
from fedtune.peft_io import adapter_state, build_peft_model
from fedtune.spec import parse_spec, spec_to_yaml
from tests.conftest import make_spec

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """One torch thread (see conftest.one_thread)."""


def _job(job_id: str, eval_file: Path, peft: str, base: Path, batch_size: int = 8) -> Job:
    text = make_spec(eval_file).replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", peft)
    text = text.replace("batch_size: 8", f"batch_size: {batch_size}")
    spec = parse_spec(text)
    return Job(job_id, job_id, spec.model_dump_json(), "running", 1, str(base), "h", "", "{}", None, "", 0.0)


def _random_adapter(base: Path, seed: int, **lora: object) -> dict[str, torch.Tensor]:
    model = build_peft_model(load_causal_lm(base, CPU), seed=seed, dropout=0.0, **lora)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    # LoRA starts with B = 0; make both matrices non-zero so the adapters change the loss.
    return {k: torch.randn_like(v) * 0.05 for k, v in adapter_state(model).items()}


def test_jobs_waiting_together_share_one_pass_and_get_their_own_losses(
        tmp_path: Path, fed_data: tuple[list[Path], Path]) -> None:
    _, eval_file = fed_data
    base = materialize_preset(TINY_PRESET, tmp_path / "base")
    jobs = [
        _job("job-a", eval_file, "peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", base),
        _job("job-b", eval_file, "peft: {r: 8, alpha: 32, target_modules: [gate_proj, up_proj, down_proj]}", base,
             batch_size=3),
        _job("job-c", eval_file, "peft: {r: 2, alpha: 2, target_modules: [o_proj]}", base),
    ]
    lora = [{"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            {"r": 8, "alpha": 32, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
            {"r": 2, "alpha": 2, "target_modules": ["o_proj"]}]
    adapters = [_random_adapter(base, k, **cfg) for k, cfg in enumerate(lora)]
    alone = Evaluator(lambda _job: base, CPU)
    expected = [alone.evaluate(j, a)["eval_loss"] for j, a in zip(jobs, adapters, strict=True)]
    assert len(set(expected)) == 3  # three different adapters, three different losses

    batcher = EvalBatcher(Evaluator(lambda _job: base, CPU), base, load_causal_lm, CPU)
    got = batcher.evaluate_many(list(zip(jobs, adapters, strict=True)))
    assert batcher.passes == [3]
    for g, e in zip(got, expected, strict=True):
        assert g["eval_loss"] == pytest.approx(e, rel=1e-5)
        assert g["eval_ppl"] == pytest.approx(torch.tensor(e).exp().item(), rel=1e-5)

    # A later round with new weights reuses the batched model and still gets each job's own loss.
    newer = [{k: v * 0.5 for k, v in a.items()} for a in adapters]
    expected = [alone.evaluate(j, a)["eval_loss"] for j, a in zip(jobs, newer, strict=True)]
    got = batcher.evaluate_many(list(zip(jobs, newer, strict=True)))
    assert batcher.passes == [3, 3]
    assert [g["eval_loss"] for g in got] == pytest.approx(expected, rel=1e-5)

    # The zero-shot evaluation (no adapter) is its own pass, from callers in their own threads.
    results: list[dict[str, float]] = []
    threads = [threading.Thread(target=lambda: results.append(batcher.evaluate(jobs[0], None)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [alone.evaluate(jobs[0], None)]
    assert batcher.passes == [3, 3]

    # A zero-shot and two adapters waiting together: the adapters share a pass, the zero-shot has its own.
    mixed = batcher.evaluate_many([(jobs[0], None), (jobs[1], newer[1]), (jobs[2], newer[2])])
    assert batcher.passes == [3, 3, 2]
    assert mixed[0] == results[0]
    assert [m["eval_loss"] for m in mixed[1:]] == pytest.approx(expected[1:], rel=1e-5)


def test_what_cannot_share_a_pass(tmp_path: Path, fed_data: tuple[list[Path], Path]) -> None:
    _, eval_file = fed_data
    base = materialize_preset(TINY_PRESET, tmp_path / "base")
    job = _job("job-a", eval_file, "peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", base)
    adapter = {"x": torch.zeros(1)}
    assert batchable(job, adapter)
    assert not batchable(job, None)  # zero-shot
    offsite = Job(**{**job.__dict__, "emulator_dir": str(tmp_path)})
    assert not batchable(offsite, adapter)
    no_eval = parse_spec(spec_to_yaml(parse_spec(make_spec(None))))
    assert not batchable(Job(**{**job.__dict__, "spec_json": no_eval.model_dump_json()}), adapter)


def test_a_failed_batched_pass_reaches_every_waiting_caller(
        tmp_path: Path, fed_data: tuple[list[Path], Path]) -> None:
    _, eval_file = fed_data
    base = materialize_preset(TINY_PRESET, tmp_path / "base")
    jobs = [_job(f"job-{k}", eval_file, "peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", base)
            for k in range(2)]
    good = _random_adapter(base, 0, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    bad = {k: v.clone() for k, v in good.items()}
    next(iter(bad.values()))[0, 0] = float("nan")
    batcher = EvalBatcher(Evaluator(lambda _job: base, CPU), base, load_causal_lm, CPU)
    with pytest.raises(Exception, match="NaN"):
        batcher.evaluate_many([(jobs[0], good), (jobs[1], bad)])
    # The worker survives: the next evaluation works.
    assert batcher.evaluate(jobs[0], good)["eval_loss"] > 0


def test_an_evaluation_pass_runs_with_the_threads_it_is_given(
        tmp_path: Path, fed_data: tuple[list[Path], Path]) -> None:
    _, eval_file = fed_data
    base = materialize_preset(TINY_PRESET, tmp_path / "base")
    job = _job("job-a", eval_file, "peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", base)
    adapter = _random_adapter(base, 0, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    batcher = EvalBatcher(Evaluator(lambda _job: base, CPU), base, load_causal_lm, CPU)
    # The scheduler sizes the pool (see SharedCompute.set_threads); the worker thread applies it,
    # since with OpenMP a thread count set in one thread does not reach another.
    first = batcher.evaluate(job, adapter)
    for threads in (2, 1):
        batcher.threads = threads
        assert batcher.evaluate(job, adapter)["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5)
        assert batcher.pass_threads[-1] == threads
