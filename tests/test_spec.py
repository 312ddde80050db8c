"""Job specs: defaults, the example template, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.errors import InvalidInput
from fedtune.spec import example_spec, parse_spec, spec_to_yaml


def test_example_spec_is_valid_and_round_trips() -> None:
    spec = parse_spec(example_spec("some/base"))
    assert spec.base_model == "some/base"
    assert spec.peft.target_modules is None  # the base family's, resolved when the job is created
    assert parse_spec(spec_to_yaml(spec)) == spec


def test_empty_spec_gets_defaults() -> None:
    spec = parse_spec("")
    assert spec.training.steps == 20 and spec.training.epochs is None
    assert spec.base_model == "tiny-llama" and spec.aggregation.strategy == "fedavg"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds: 0", "job spec: rounds: Input should be greater than 0"),
        ("roundz: 3", "job spec: roundz: unknown key"),
        ("peft: {r: 8, bogus: 1}", "job spec: peft.bogus: unknown key"),
        ("peft: {method: prefix}", "job spec: peft.method:"),
        ("training: {lr: 0}", "job spec: training.lr:"),
        ("training: {steps: 3, epochs: 1}", "set only one of training.steps and training.epochs"),
        ("clients_per_round: 2\nmin_clients: 3", "min_clients (3) is larger than clients_per_round (2)"),
        ("aggregation: {strategy: krumm}", "job spec: aggregation.strategy: unknown aggregation strategy 'krumm'"),
        ("aggregation: {strategy: fedadam, options: {beta3: 0.9}}", "job spec: aggregation.options.beta3: unknown option"),
        ("aggregation: {strategy: fedadam, options: {beta1: 1.5}}", "job spec: aggregation.options.beta1: Input should be less than 1"),
        ("aggregation: {strategy: krum, options: {byzantine: 2}}\nmin_clients: 5\nclients_per_round: 8",
         "krum: needs at least 7 updates per round"),
        ("aggregation: {strategy: bulyan}\nmin_clients: 6\nclients_per_round: 8", "bulyan: needs at least 7 updates"),
        ("aggregation: {strategy: fedmedian}\nsecure_aggregation: {}\nmin_clients: 3",
         "fedmedian compares each client's update with the others, and secure aggregation"),
        ("aggregation: {strategy: multikrum}\nprivacy: {}\nmin_clients: 5\nclients_per_round: 5",
         "the DP accountant assumes the Gaussian mechanism on the sum"),
        ("aggregation: {mode: async}\nsecure_aggregation: {}\nmin_clients: 3", "aggregation.mode async: secure aggregation"),
        ("aggregation: {strategy: scaffold}\nsecure_aggregation: {}\nmin_clients: 3", "control variate travels in the clear"),
        ("aggregation: {strategy: fedprox, options: {mu: -1}}", "aggregation.options.mu: Input should be greater than or equal to 0"),
        ("aggregation: {async: {buffer: 0}}", "job spec: aggregation.async.buffer"),
        ("evaluation: {metrics: [bleu]}", "job spec: evaluation.metrics.0"),
        ("codec: int3", "job spec: codec:"),
        ("- a list", "job spec must be a YAML mapping"),
        ("secure_aggregation: {degree: 3, threshold: 2}", "degree (3) must be even"),
        ("secure_aggregation: {degree: 4, threshold: 5}", "threshold (5) is larger than degree (4)"),
        ("secure_aggregation: {degree: 4, threshold: 2}", "must be more than degree/2"),
        ("secure_aggregation: {degree: 4, threshold: 3}\nmin_clients: 3",
         "secure_aggregation.degree (4) must be below min_clients (3)"),
        ("secure_aggregation: {degree: 2, threshold: 2}\ncodec: fp16", "codec fp16 is not additive"),
        ("privacy: {delta: 2}", "job spec: privacy.delta:"),
        ("privacy: {noise_multiplier: -1}", "job spec: privacy.noise_multiplier:"),
        ("a: [", "job spec is not valid YAML"),
        ("offsite: {tune: blocks}", "offsite.tune: blocks needs mode: offsite (a federated job has no adapter blocks)"),
        ("mode: offsite\noffsite: {tune: blocks}\nclient_quantization: nf4",
         "offsite.tune: blocks trains the adapter blocks' own weights, which client_quantization nf4 would quantize"),
        ("mode: offsite\noffsite: {tune: blocks}\npeft: {r: 4}", "peft settings have no effect with offsite.tune: blocks"),
        ("mode: offsite\noffsite: {tune: full}", "job spec: offsite.tune: Input should be 'lora' or 'blocks'"),
        ("mode: offsite\noffsite: {tune: blocks}\nclients_per_round: 3\nmin_clients: 3\ncodec: int8\nsecure_aggregation: {}",
         "codec int8 is not additive"),
    ],
)
def test_bad_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_spec(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_every_unknown_key_is_named_at_once() -> None:
    text = "roundz: 3\npeft: {r: 8, bogus: 1}\ntraining: {stepz: 2, lr: 0.01}\nrounds: 0\n"
    with pytest.raises(InvalidInput) as info:
        parse_spec(text)
    message = str(info.value)
    assert message.startswith("job spec: unknown keys ")
    named = message.removeprefix("job spec: unknown keys ").split(";")[0].split(", ")
    assert sorted(named) == ["peft.bogus", "roundz", "training.stepz"]
    # A bad value beside them is still named, in the same line.
    assert message.endswith("; also rounds: Input should be greater than 0") and "\n" not in message


def test_secure_and_private_specs_that_work_are_accepted() -> None:
    spec = parse_spec("clients_per_round: 10\nmin_clients: 9\nsecure_aggregation: {degree: 8, threshold: 5}\n"
                      "privacy: {clip_norm: 0.5, noise_multiplier: 1.1}")
    assert spec.secure_aggregation is not None and spec.secure_aggregation.threshold == 5
    assert spec.privacy is not None and spec.privacy.delta == 1e-5


def test_block_tuning_specs_that_work_are_accepted() -> None:
    # Secure aggregation (fp32), lossy codecs and a quantized emulator middle all apply to block deltas too.
    for extra in ("clients_per_round: 3\nmin_clients: 3\nsecure_aggregation: {}", "codec: topk:0.1+int8",
                  "privacy: {clip_norm: 0.5}"):
        spec = parse_spec("mode: offsite\noffsite: {tune: blocks, quantize: int8}\n" + extra)
        assert spec.tunes_blocks
    assert not parse_spec("mode: offsite").tunes_blocks


def test_relative_paths_resolve_against_the_spec_dir(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    spec = parse_spec("base_model: model\neval_data: eval.jsonl", base_dir=tmp_path)
    assert spec.base_model == str(tmp_path / "model")
    assert spec.eval_data == str(tmp_path / "eval.jsonl")
    # A name that is not a local directory stays as it is (a preset or hub id).
    assert parse_spec("base_model: org/model", base_dir=tmp_path).base_model == "org/model"
