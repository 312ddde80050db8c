"""Federated evaluation: clients evaluate the published adapter on held-out data and send metrics only."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest
import torch

from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import Admin, fedtune_cmd, make_spec


def _agents(coordinator, admin: Admin, job: str, tmp_path: Path, specs: list[dict]):  # type: ignore[no-untyped-def]
    from fedtune.client.agent import ClientAgent
    from fedtune.client.channel import INSECURE

    agents = [ClientAgent(coordinator.address, admin.token(job), s["data"], tmp_path / f"c{i}", INSECURE, device="cpu",
                          name=f"c{i}", progress=False, eval_fraction=s.get("fraction"), eval_data=s.get("eval"))
              for i, s in enumerate(specs)]
    errors: list[BaseException] = []

    def run(a: ClientAgent) -> None:
        try:
            a.run()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return agents


def test_clients_evaluate_each_round_on_held_out_data_and_the_numbers_are_their_own(  # type: ignore[no-untyped-def]
        coordinator, admin: Admin, fed_data, tmp_path: Path) -> None:
    from peft import PeftModel

    from fedtune.data import load_jsonl, tokenize
    from fedtune.models import load_causal_lm, load_tokenizer
    from fedtune.training import evaluate_loss

    clients, eval_file = fed_data
    job = admin.create_job(make_spec(eval_file, steps=6, rounds=2, clients=3) + "evaluation: {clients: true, metrics: [loss, perplexity, token_accuracy]}\n")
    agents = _agents(coordinator, admin, job, tmp_path, [
        {"data": clients[0], "fraction": 0.25}, {"data": clients[1], "eval": clients[3]}, {"data": clients[2]}])
    status = admin.job(job)
    assert status.state == "finished"
    for r in status.history:
        reports = {e.client_id: e for e in r.client_evals}
        assert len(reports) == 3, r.round
        ids = [a._client_id for a in agents]
        assert reports[ids[0]].num_examples == 8 and reports[ids[1]].num_examples == 32
        assert reports[ids[2]].num_examples == 0  # holds nothing out
        m = json.loads(r.metrics_json)
        losses = [json.loads(reports[i].metrics_json)["eval_loss"] for i in ids[:2]]
        assert m["clients_evaluated"] == 2 and m["clients_eval_examples"] == 40
        assert m["clients_eval_loss"] == pytest.approx((8 * losses[0] + 32 * losses[1]) / 40)
        assert 0 <= m["clients_eval_token_accuracy"] <= 1
        assert all("eval_token_accuracy" in json.loads(reports[i].metrics_json) for i in ids[:2])
    # The second client's number is what it gets itself from the published adapter on its own file.
    co = coordinator.coordinator
    published = co.adapters_root / job / "round-2"
    base_dir = co.base_dir(co.state.job(job))
    model = PeftModel.from_pretrained(load_causal_lm(base_dir, torch.device("cpu")), published).eval()
    tokenizer = load_tokenizer(base_dir)
    mine = evaluate_loss(model, tokenize(load_jsonl(clients[3]), tokenizer, 48), pad_id=tokenizer.pad_token_id,
                         batch_size=8, device=torch.device("cpu"))
    last = {e.client_id: json.loads(e.metrics_json) for e in status.history[-1].client_evals}
    assert last[agents[1]._client_id]["eval_loss"] == pytest.approx(mine, rel=1e-5)
    # Nothing but metrics reached the coordinator: no update or report carries the held-out examples.
    held = {json.loads(line)["response"] for line in clients[3].read_text().splitlines()}
    db = (co.state_dir / "state.db").read_bytes().decode(errors="ignore")
    assert held and not any(h in db for h in held)
    out = fedtune_cmd("job", "status", job, "--state-dir", str(co.state_dir), "--insecure", "--coordinator",
                      coordinator.address, check=True).stdout
    assert "round 2 on clients' held-out data: loss" in out and "no held-out data" in out


def test_held_out_data_is_checked_before_joining(tmp_path: Path, fed_data) -> None:  # type: ignore[no-untyped-def]
    from fedtune.client.agent import check_same_schema, split_holdout
    from fedtune.data import read_data

    clients, _ = fed_data
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(InvalidInput, match="held-out data must be of the training data's schema"):
        check_same_schema(read_data(clients[0]), read_data(chat), clients[0], chat)
    train, held = split_holdout(read_data(clients[0]), 0.25)
    assert len(held) == 8 and len(train) == 24
    assert not set(held.numbers) & set(train.numbers)  # type: ignore[union-attr]
    again = split_holdout(read_data(clients[0]), 0.25)[1]
    assert again.records == held.records  # type: ignore[union-attr]
    with pytest.raises(InvalidInput, match="leave none to train on"):
        split_holdout(read_data(chat), 0.5)
    proc = fedtune_cmd("client", "run", "--coordinator", "127.0.0.1:1", "--token", "x", "--data", str(clients[0]),
                       "--eval-data", str(chat), "--insecure", "--state-dir", str(tmp_path / "s"))
    assert proc.returncode != 0 and "held-out data must be of the training data's schema" in proc.stderr


def test_a_report_for_an_unpublished_round_or_a_job_without_client_eval_is_refused(  # type: ignore[no-untyped-def]
        coordinator, admin: Admin) -> None:
    from tests.test_rpc_contract import RawClient

    job = admin.create_job(make_spec())
    raw = RawClient(coordinator.address, admin.token(job))
    with pytest.raises(grpc.RpcError) as info:
        raw.stub.ReportEval(pb.EvalReport(job_id=job, round=1, num_examples=3, metrics={"eval_loss": 1.0}),
                            metadata=raw.md("ReportEval"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not ask clients to evaluate" in info.value.details()
    job2 = admin.create_job(make_spec() + "evaluation: {clients: true}\n")
    raw2 = RawClient(coordinator.address, admin.token(job2))
    with pytest.raises(grpc.RpcError) as info:
        raw2.stub.ReportEval(pb.EvalReport(job_id=job2, round=1, num_examples=3, metrics={"eval_loss": 1.0}),
                             metadata=raw2.md("ReportEval"))
    assert "round 1 of job" in info.value.details() and "is not published" in info.value.details()
    assert coordinator.coordinator.state.client_evals(job2) == []
