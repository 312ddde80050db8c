"""The adapter registry: tags and rollback, lineage in signed manifests, model cards, merged models,
and vLLM's view of a pulled adapter. A real in-process coordinator publishes three rounds of a job
(a hand-driven client sends a different update each round); the `fedtune` CLI runs as a process."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from fedtune.adapters import verify_adapter_dir
from fedtune.cli.main import main
from fedtune.coordinator.server import RunningCoordinator, start
from fedtune.crypto.signing import sign_manifest
from fedtune.errors import ExitCode, InvalidInput, NotFound
from fedtune.peft_io import tensors_to_bytes
from fedtune.protos import fedtune_pb2 as pb
from fedtune.registry import list_published, resolve
from fedtune.registry.card import front_matter
from fedtune.registry.interop import vllm_problems
from fedtune.registry.lineage import lineage_of
from tests.conftest import Admin, fedtune_cmd, make_spec, wait_until
from tests.test_rpc_contract import RawClient, _code, _delta

pytestmark = pytest.mark.integration

ROUNDS = 3


class Published:
    """A coordinator whose job has published ROUNDS rounds; restartable on the same state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.running: RunningCoordinator = start(state_dir, "127.0.0.1", 0, insecure=True)
        self.admin = Admin(self.running)
        self.job = self.publish(make_spec(rounds=ROUNDS))

    def publish(self, spec: str, rounds: int = ROUNDS) -> str:
        job = self.admin.create_job(spec)
        client = RawClient(self.running.address, self.admin.token(job))
        for r in range(1, rounds + 1):
            task = client.task()
            # A different, nonzero update each round: every round's adapter differs from the base and the others.
            client.send(task, tensors_to_bytes(_delta(client.global_state(task), 0.05 * r)), update_id=f"{job}-u{r}")
        wait_until(lambda: self.running.coordinator.state.job(job).state == "finished", timeout=120,
                   what="the job to publish its last round")
        client.channel.close()
        return job

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Runs `fedtune ARGS --state-dir ...` through its entry point, in this process (a process per
        command costs seconds of imports on a loaded machine; test_cli_errors covers the process itself)."""
        argv = [*args, "--state-dir", str(self.state_dir)]
        out, err = io.StringIO(), io.StringIO()
        handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(argv)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        finally:
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
        if check and code != 0:
            raise AssertionError(f"fedtune {' '.join(argv)} exited {code}:\n{err.getvalue()[-3000:]}")
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())

    def key(self) -> str:
        return base64.b64encode(self.running.coordinator.keys.signing_public_key()).decode()

    def restart(self) -> None:
        self.admin.channel.close()
        self.running.stop(grace=0.5)
        self.running = start(self.state_dir, "127.0.0.1", 0, insecure=True)
        self.admin = Admin(self.running)

    def close(self) -> None:
        self.admin.channel.close()
        self.running.stop(grace=0.5)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    p = Published(tmp_path_factory.mktemp("registry") / "coord")
    yield p
    p.close()


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("fedtune: error:")]
    assert lines, stderr
    return lines[-1]


def _tags(reg: Published) -> dict[int, tuple[str, ...]]:
    return {a.round: a.tags for a in list_published(reg.state_dir, reg.job)}


def test_tag_list_rollback_pull_and_untag(reg: Published, tmp_path: Path) -> None:
    job = reg.job
    tagged = reg.cli("adapters", "tag", job, "3", "production", check=True)
    assert tagged.stdout.strip() == f"{job}@3" and "new tag" in tagged.stderr
    reg.cli("adapters", "tag", job, "3", "staging", check=True)
    rows = json.loads(reg.cli("adapters", "list", "--tag", "production", "--format", "json", check=True).stdout)
    assert [(r["job"], r["round"], r["tags"]) for r in rows] == [(job, 3, ["production", "staging"])]
    text = reg.cli("adapters", "list", "--job", job, check=True).stdout
    assert re.search(r"round +3 .*\[production, staging\]", text) and "round   1" in text
    # The read side sees it at once, through its read-only connection, while the coordinator runs.
    assert resolve(reg.state_dir, f"{job}@production").round == 3
    assert resolve(reg.state_dir, job).round == ROUNDS == resolve(reg.state_dir, f"{job}@latest").round

    # Rollback: the tag moves back to round 2; staging stays.
    moved = reg.cli("adapters", "tag", job, "2", "production", check=True)
    assert "was round 3" in moved.stderr
    assert _tags(reg) == {1: (), 2: ("production",), 3: ("staging",)}
    rows = json.loads(reg.cli("adapters", "list", "--tag", "production", "--format", "json", check=True).stdout)
    assert [r["round"] for r in rows] == [2]
    out = tmp_path / "prod"
    assert reg.cli("adapters", "pull", f"{job}@production", "--out", str(out), check=True).stdout.strip() == str(out)
    assert verify_adapter_dir(out, reg.key())["round"] == 2

    untagged = reg.cli("adapters", "untag", job, "production", check=True)
    assert "was round 2" in untagged.stderr
    assert json.loads(reg.cli("adapters", "list", "--tag", "production", "--format", "json", check=True).stdout) == []
    with pytest.raises(NotFound, match=f"no published adapter {job}@production: .*no tag 'production'"):
        resolve(reg.state_dir, f"{job}@production")
    gone = reg.cli("adapters", "pull", f"{job}@production", "--out", str(tmp_path / "x"))
    assert gone.returncode == ExitCode.BAD_INPUT and "no tag 'production'" in _error_line(gone.stderr)


def test_bad_tag_requests_are_refused_and_change_nothing(reg: Published) -> None:
    job, stub, md = reg.job, reg.admin.stub, reg.admin.md
    stub.TagAdapter(pb.TagAdapterRequest(job_id=job, round=1, tag="canary"), metadata=md)
    before = _tags(reg)

    def code(**request: object) -> grpc.StatusCode:
        return _code(lambda: stub.TagAdapter(pb.TagAdapterRequest(**request), metadata=md))

    assert code(job_id=job, round=ROUNDS + 5, tag="canary") == grpc.StatusCode.NOT_FOUND
    assert code(job_id=job, round=0, tag="canary") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(job_id=job, round=2, tag="Canary") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(job_id=job, round=2, tag="7") == grpc.StatusCode.INVALID_ARGUMENT  # JOB@7 is a round
    assert code(job_id=job, round=2, tag="latest") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(job_id="job-00000000", round=1, tag="canary") == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: stub.UntagAdapter(pb.UntagAdapterRequest(job_id=job, tag="nope"), metadata=md)) \
        == grpc.StatusCode.NOT_FOUND
    # Admin writes need the admin credential, as every other admin call.
    assert _code(lambda: stub.TagAdapter(pb.TagAdapterRequest(job_id=job, round=2, tag="canary"))) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert _tags(reg) == before

    # As a user's shell sees it: a process, one line, the stable exit code.
    missing = fedtune_cmd("adapters", "tag", job, str(ROUNDS + 5), "canary", "--state-dir", str(reg.state_dir))
    assert missing.returncode == ExitCode.BAD_INPUT
    assert _error_line(missing.stderr) == (f"fedtune: error: job {job} has no published round {ROUNDS + 5} to tag "
                                           f"(published rounds: 1-{ROUNDS})")
    bad = reg.cli("adapters", "tag", job, "2", "Prod!")
    assert bad.returncode == ExitCode.BAD_INPUT and "bad tag name 'Prod!'" in _error_line(bad.stderr)
    unknown = reg.cli("adapters", "untag", "job-00000000", "canary")
    assert unknown.returncode == ExitCode.BAD_INPUT and "no job 'job-00000000'" in _error_line(unknown.stderr)
    assert _tags(reg) == before
    with pytest.raises(InvalidInput, match="bad adapter reference"):
        resolve(reg.state_dir, f"{job}@")
    with pytest.raises(NotFound, match=f"job {job} has published rounds 1, 2, 3"):
        resolve(reg.state_dir, f"{job}@9")
    stub.UntagAdapter(pb.UntagAdapterRequest(job_id=job, tag="canary"), metadata=md)


def test_lineage_is_in_every_signed_manifest(reg: Published) -> None:
    state = reg.running.coordinator.state
    job = state.job(reg.job)
    for adapter in list_published(reg.state_dir, reg.job):
        manifest = verify_adapter_dir(adapter.path, reg.key())
        lin = lineage_of(manifest)
        assert (lin.job, lin.round, lin.parent_round) == (reg.job, adapter.round, adapter.round - 1)
        assert lin.spec_sha256 == hashlib.sha256(job.spec_json.encode()).hexdigest()
        assert lin.base_model_hash == job.base_hash and lin.contributors == 1
        assert (lin.strategy, lin.method) == ("fedavg", "lora")
        assert lin.metrics["contributors"] == 1.0 and "train_loss" in lin.metrics
    # Lineage is covered by the signature: an edited parent round no longer verifies.
    path = list_published(reg.state_dir, reg.job)[-1].path
    forged_dir = reg.state_dir.parent / "forged"
    shutil.copytree(path, forged_dir)
    manifest = json.loads((forged_dir / "fedtune.json").read_text())
    manifest["lineage"]["parent_round"] = 0
    (forged_dir / "fedtune.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInput, match="signature does not verify"):
        verify_adapter_dir(forged_dir, reg.key())
    # A manifest from before lineage (no `lineage` block) still verifies and reads, its new fields None.
    published = json.loads((path / "fedtune.json").read_text())
    old = {k: v for k, v in published.items() if k not in ("lineage", "signature")}
    (forged_dir / "fedtune.json").write_text(json.dumps(sign_manifest(old, reg.running.coordinator.keys.signing_key)))
    lin = lineage_of(verify_adapter_dir(forged_dir, reg.key()))
    assert (lin.spec_sha256, lin.parent_round, lin.round, lin.method) == (None, None, ROUNDS, "lora")


def test_card_is_written_into_a_pulled_adapter_and_keeps_it_verifiable(reg: Published, tmp_path: Path) -> None:
    reg.cli("adapters", "tag", reg.job, "2", "production", check=True)
    target = tmp_path / "card"
    written = reg.cli("adapters", "card", f"{reg.job}@production", "--dir", str(target), check=True)
    assert written.stdout.strip() == str(target / "README.md")
    text = (target / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "tiny-llama" and meta["library_name"] == "peft"
    assert {"peft", "lora", "federated-learning"} <= set(meta["tags"])
    assert f"# test: job {reg.job}, round 2" in text
    assert "| data owners | 1 enrolled; 1 contributed to round 2 |" in text
    assert "| differential privacy | none" in text
    assert re.search(r"^\| 1 \| 1 \| 10 \| 1 \|$", text, re.MULTILINE) and re.search(r"^\| 2 \| 1 \| 10 \| 1 \|$", text, re.MULTILINE)
    assert "| 3 |" not in text  # rounds after the one carded are not its history
    assert "PeftModel.from_pretrained(base" in text and "vllm serve" in text and "--enable-lora" in text
    # README.md is not a signed file: the adapter verifies as pulled, by the CLI as a user runs it.
    ok = fedtune_cmd("adapters", "verify", str(target), "--public-key", reg.key())
    assert ok.returncode == 0, ok.stderr
    # A directory holding another round is refused, not overwritten.
    other = reg.cli("adapters", "card", f"{reg.job}@1", "--dir", str(target))
    assert other.returncode == ExitCode.BAD_INPUT
    assert f"holds {reg.job}@2, not {reg.job}@1" in _error_line(other.stderr)
    reg.admin.stub.UntagAdapter(pb.UntagAdapterRequest(job_id=reg.job, tag="production"), metadata=reg.admin.md)


def test_pulled_lora_adapter_is_what_vllm_loads(reg: Published, tmp_path: Path) -> None:
    """What `vllm serve BASE --enable-lora --lora-modules NAME=DIR` reads, checked file by file against
    vLLM's loader (vllm-project/vllm, vllm/lora/): ``peft_helper.py`` PEFTHelper.from_local_dir and
    validate_legal read adapter_config.json and need ``r``, ``lora_alpha``, ``target_modules``, ``bias``
    "none" (without --enable-lora-bias), no ``modules_to_save``, no ``use_dora``, ``r`` <= --max-lora-rank
    (16 by default), and scale by lora_alpha / r (it has no rank_pattern / alpha_pattern);
    ``lora_model.py`` LoRAModel.from_local_checkpoint reads adapter_model.safetensors and passes each key
    to ``utils.py`` parse_fine_tuned_lora_name, which takes ``base_model.model.<module>.lora_A.weight`` /
    ``.lora_B.weight`` and requires the module's last name to be a linear layer of the base."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "vllm-adapter"
    reg.cli("adapters", "pull", f"{reg.job}@2", "--out", str(out), check=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and not config["modules_to_save"]
    assert isinstance(config["r"], int) and config["r"] <= 16 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and not config["use_dora"]
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    linear = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            m = re.fullmatch(r"base_model\.model\.(model\.layers\.\d+\.self_attn\.[qv]_proj)\.lora_([AB])\.weight", key)
            assert m, key
            layer, shape = linear[m.group(1)], tuple(f.get_slice(key).get_shape())
            want = (config["r"], layer.in_features) if m.group(2) == "A" else (layer.out_features, config["r"])
            assert shape == want, key
    assert len(keys) == 2 * 2 * base.config.num_hidden_layers  # A and B, q and v, every block
    assert vllm_problems(out, linear_modules={n.rsplit(".", 1)[-1] for n in linear}) == []
    # The checker does fail: what vLLM refuses is named.
    config["modules_to_save"] = ["lm_head"]
    config["r"] = 64
    (out / "adapter_config.json").write_text(json.dumps(config))
    problems = vllm_problems(out)
    assert any("modules_to_save" in p for p in problems) and any("--max-lora-rank 16" in p for p in problems)


def test_merged_model_loads_in_transformers_and_matches_base_plus_adapter(reg: Published, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    done = reg.cli("adapters", "merge", f"{reg.job}@2", "--out", str(merged_dir), check=True)
    assert done.stdout.strip() == str(merged_dir)
    adapter = resolve(reg.state_dir, f"{reg.job}@2").path
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 11, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        got = merged(ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        plain = base(ids).logits
        want = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the output, so equality means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Another base (one changed byte) is named and refused before anything is written.
    other = tmp_path / "other-base"
    shutil.copytree(base_path, other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    refused = reg.cli("adapters", "merge", f"{reg.job}@2", "--out", str(tmp_path / "m2"), "--base", str(other))
    assert refused.returncode == ExitCode.BAD_INPUT and not (tmp_path / "m2").exists()
    assert f"base model {other} is not the one the adapter was trained on" in _error_line(refused.stderr)
    # --out must be new: nothing is overwritten.
    again = reg.cli("adapters", "merge", f"{reg.job}@2", "--out", str(merged_dir))
    assert again.returncode == ExitCode.BAD_INPUT and "exists and is not empty" in _error_line(again.stderr)


def test_merge_refuses_prompt_tuning(reg: Published, tmp_path: Path) -> None:
    job = reg.publish(make_spec().replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
                                          "peft: {method: prompt_tuning, num_virtual_tokens: 4}"), rounds=1)
    refused = reg.cli("adapters", "merge", job, "--out", str(tmp_path / "m"))
    assert refused.returncode == ExitCode.BAD_INPUT
    assert "peft cannot merge a prompt_tuning adapter" in _error_line(refused.stderr)
    assert not (tmp_path / "m").exists()


def test_tags_survive_a_coordinator_restart(reg: Published) -> None:
    reg.cli("adapters", "tag", reg.job, "1", "stable", check=True)
    reg.restart()
    (row,) = reg.admin.stub.ListAdapters(pb.ListAdaptersRequest(tag="stable"), metadata=reg.admin.md).adapters
    assert (row.job_id, row.round, list(row.tags)) == (reg.job, 1, ["stable"])
    assert resolve(reg.state_dir, f"{reg.job}@stable").round == 1


def test_card_of_a_private_job_states_its_epsilon_round_by_round() -> None:
    from fedtune.registry.card import render_card

    def manifest(rnd: int, eps: float) -> dict[str, object]:
        return {"job": "job-1", "job_name": "clinic-notes", "round": rnd, "base_model": "HuggingFaceTB/SmolLM2-135M",
                "base_model_hash": "ab" * 32, "contributors": 4, "peft": {"method": "lora", "r": 8, "alpha": 16},
                "aggregation": {"strategy": "fedavg"}, "lineage": {"spec_sha256": "cd" * 32, "parent_round": rnd - 1},
                "metrics": {"contributors": 4.0, "examples": 512.0, "train_loss": 2.5 / rnd, "eval_loss": 2.0 / rnd,
                            "epsilon": eps},
                "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5, "epsilon": eps,
                            "accountant": "rdp-subsampled-gaussian"}}

    history = [manifest(1, 1.5), manifest(2, 2.25)]
    text = render_card(history[1], history, data_owners=6)
    meta = front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and "differential-privacy" in meta["tags"]
    assert "| differential privacy | epsilon 2.25 at delta 1e-05 (noise multiplier 1.1, clip norm 1," in text
    assert "| data owners | 6 enrolled; 4 contributed to round 2 |" in text
    assert "| round | contributors | examples | train loss | eval loss | epsilon |" in text
    assert "| 1 | 4 | 512 | 2.5 | 2 | 1.5 |" in text and "| 2 | 4 | 512 | 1.25 | 1 | 2.25 |" in text
    assert "vllm serve" not in text  # not claimed unless the directory passed the vLLM check


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_merge_unties_embeddings_the_adapter_changes(tmp_path: Path, target: str) -> None:
    """A base that ties lm_head to embed_tokens (as most small Llamas do): merging a LoRA on one of them
    in place would change both; the merged model gets its own copy and equals base + adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from fedtune.models import TINY_PRESET, load_tokenizer, materialize_preset
    from fedtune.registry.merge import merge_adapter

    tok_dir = materialize_preset(TINY_PRESET, tmp_path / "preset")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(load_tokenizer(tok_dir)), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    base_dir = tmp_path / "tied"
    LlamaForCausalLM(cfg).save_pretrained(base_dir)
    load_tokenizer(tok_dir).save_pretrained(base_dir)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", target]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", base_dir, tmp_path / "merged", {"peft": {"method": "lora"}})
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter"))
        expected = want.eval()(ids).logits
    assert not merged.config.tie_word_embeddings
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "merged" / "fedtune-merge.json").read_text())["untied_embeddings"] is True
