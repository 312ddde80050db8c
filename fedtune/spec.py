"""Job specs: the YAML an operator writes, validated with pydantic at the boundary.

An unknown key or a bad value is an :class:`~fedtune.errors.InvalidInput` whose message names the
key (``job spec: peft.r: Input should be greater than 0``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from fedtune.errors import InvalidInput
from fedtune.methods import METHODS, MethodOptions, get_method

if TYPE_CHECKING:
    from fedtune.strategies import Strategy

# Validation context key of specs read back from the coordinator's state (see JobSpec.stored).
_STORED = "fedtune-stored-spec"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _method_tag(value: object) -> str:
    # peft.method picks the options model; a spec without one means LoRA, as before methods had names.
    if isinstance(value, dict):
        return str(value.get("method", "lora"))
    return str(getattr(value, "method", "lora"))


# The options of every registered PEFT method (fedtune.methods), told apart by ``method``. Built
# from the registry at import, so static checkers see it as Any (each method's options differ).
if TYPE_CHECKING:
    PeftSpec = Any
else:
    PeftSpec = Annotated[
        Union[tuple(Annotated[m.options, Tag(name)] for name, m in METHODS.items())],  # noqa: UP007
        Discriminator(_method_tag, custom_error_type="unknown_method",
                      custom_error_message=f"unknown PEFT method; known: {', '.join(METHODS)}"),
    ]


def default_peft() -> MethodOptions:
    """The ``peft`` section of a spec that gives none: LoRA with its defaults."""
    return METHODS["lora"].options.model_validate({})


class TrainingSpec(_Strict):
    """Local training hyper-parameters handed to each client with its task (the training recipe).

    ``batch_size`` is the effective batch of one optimizer step. A client runs it as
    ``gradient_accumulation_steps`` micro-batches of ``batch_size / gradient_accumulation_steps``
    examples (or of its own ``--micro-batch``), so every client's step means the same thing.
    The learning-rate schedule runs over the whole job by global step: round ``r`` (from 1) starts
    at step ``(r - 1) * steps`` (with ``epochs``, the client's own steps per round), so warmup and
    decay continue across rounds instead of restarting in each.
    """

    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(3e-3, gt=0, le=1)
    batch_size: int = Field(8, gt=0, le=4096)
    max_seq_len: int = Field(128, gt=1, le=131072)
    seed: int = 0
    gradient_accumulation_steps: int = Field(1, gt=0, le=4096)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    # AdamW's decoupled weight decay (torch's default).
    weight_decay: float = Field(0.01, ge=0, lt=1)
    # Gradients of the adapter are clipped to this L2 norm per optimizer step; null: no clipping.
    max_grad_norm: float | None = Field(1.0, gt=0)
    # Recompute each block's activations in the backward pass instead of keeping them (memory for time).
    gradient_checkpointing: bool = False
    # auto: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU. bf16/fp16 load the frozen
    # base in that type and run the forward under autocast; the adapter's weights stay fp32
    # (fp16 adds a GradScaler).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Pack short examples into sequences of max_seq_len; attention stays within each example.
    packing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_steps(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("steps") is None and data.get("epochs") is None:
            return {**data, "steps": 20}
        return data

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingSpec:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set only one of training.steps and training.epochs")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set only one of training.warmup_steps and training.warmup_ratio")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide "
                             f"batch_size ({self.batch_size}): the micro-batch is batch_size / accumulation")
        return self


class DataSpec(_Strict):
    """How every client (and the coordinator's evaluation) reads and renders its examples.

    A record's schema is found from its keys: ``{prompt, response}``, ``{text}``, alpaca
    ``{instruction, input, output}``, chat ``{messages: [{role, content}]}`` or ShareGPT
    ``{conversations: [{from, value}]}``. The column keys below name the field of the data that
    plays each part, for files with other names (``data: {prompt: question, response: answer}``).
    """

    prompt: str | None = Field(None, min_length=1)
    response: str | None = Field(None, min_length=1)
    text: str | None = Field(None, min_length=1)
    instruction: str | None = Field(None, min_length=1)
    input: str | None = Field(None, min_length=1)
    output: str | None = Field(None, min_length=1)
    messages: str | None = Field(None, min_length=1)
    conversations: str | None = Field(None, min_length=1)
    # How conversations are rendered: auto (the base tokenizer's own chat template, else fedtune's
    # default ChatML template), tokenizer (its own; an error if it has none), default (ChatML), or
    # a Jinja template of its own. The loss covers the assistant turns only.
    chat_template: str = Field("auto", min_length=1)
    # Put before every conversation that has no system turn of its own.
    system_prompt: str | None = None
    # Also render prompt/response and alpaca records through the chat template (one user turn, one
    # assistant turn), as an instruct model expects; off: prompt and response are joined as text.
    pairs_as_chat: bool = False
    # An example longer than training.max_seq_len is cut to it (truncate) or left out (drop).
    too_long: Literal["truncate", "drop"] = "truncate"

    def columns(self) -> dict[str, str]:
        """The data's name for each part that the spec maps (the part's own name where unmapped)."""
        parts = ("prompt", "response", "text", "instruction", "input", "output", "messages", "conversations")
        return {part: getattr(self, part) or part for part in parts}


class AsyncSpec(_Strict):
    """Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022), with ``aggregation.mode: async``."""

    # A new global version is aggregated from every `buffer` arriving updates (FedBuff's K); null: min_clients.
    buffer: int | None = Field(None, ge=1)
    # An update trained on a version s versions old weighs (1 + s) ** -staleness_exponent.
    staleness_exponent: float = Field(0.5, ge=0)
    # Updates more than this many versions old are refused (null: any age).
    max_staleness: int | None = Field(None, ge=0)


class AggregationSpec(_Strict):
    """How accepted updates become the next global adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    # A registered strategy (fedtune job init --list-strategies): fedavg, fedavgm, fedadam, fedyogi,
    # fedadagrad, fedmedian, fedtrimmedavg, krum, multikrum, bulyan, fedprox, scaffold.
    strategy: str = Field("fedavg", min_length=1)
    # The strategy's own options (fedadam: server_lr, beta1, beta2, tau; krum: byzantine; ...).
    options: dict[str, Any] = Field(default_factory=dict)
    # sync: rounds with a cohort; async: a new version every `async.buffer` updates, no one waits.
    mode: Literal["sync", "async"] = "sync"
    async_: AsyncSpec = Field(default_factory=lambda: AsyncSpec.model_validate({}), alias="async")
    # LoRA only. factors: FedAvg of A and B apart; exact: mean of the products B·A, re-factored to
    # rank r by SVD; ffa: A frozen at its shared init, only B trains and travels (FFA-LoRA);
    # fedsa: A is shared and averaged, each client keeps training its own B (FedSA-LoRA).
    lora: Literal["factors", "exact", "ffa", "fedsa"] = "factors"
    # Updates whose L2 norm is above this are rejected at upload (None: no bound).
    max_update_norm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _known_strategy(self) -> AggregationSpec:
        from fedtune.strategies import get_strategy

        try:
            get_strategy(self.strategy, self.options)
        except InvalidInput as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("aggregation.") else f"aggregation.strategy: {msg}") from None
        return self

    def build(self) -> Strategy:
        """The job's strategy with its options."""
        from fedtune.strategies import get_strategy

        return get_strategy(self.strategy, self.options)


MetricName = Literal["loss", "perplexity", "token_accuracy", "exact_match", "choice_accuracy"]
_DEFAULT_METRICS: tuple[MetricName, ...] = ("loss", "perplexity")


class EvaluationSpec(_Strict):
    """What is measured after each round: by the coordinator on eval_data, and by clients on their
    own held-out data (``clients: true``; they send metrics only, never examples)."""

    # loss, perplexity (token-level), token_accuracy (greedy next token), exact_match (greedy
    # generation of the response, compared normalised), choice_accuracy (multiple-choice lines
    # {prompt, choices, answer}: the option of highest log-likelihood).
    metrics: list[MetricName] = Field(default_factory=lambda: list(_DEFAULT_METRICS), min_length=1)
    # Federated evaluation: clients evaluate the global adapter on their held-out data.
    clients: bool = False
    # Every this many rounds (and always after the last).
    every: int = Field(1, ge=1)
    # exact_match: the longest generated response, in tokens.
    max_new_tokens: int = Field(32, ge=1, le=4096)


class SecureAggregationSpec(_Strict):
    """SecAgg+ (Bell et al. 2020): the coordinator learns only the cohort's sum."""

    # Neighbours per client in the masking graph (even; below min_clients). Null: chosen per cohort
    # so that any `dropout_tolerance` of it may drop (see auto_degree).
    degree: int | None = Field(None, ge=2)
    # Shares needed to rebuild a dropped client's mask key; more than degree/2. Null: degree/2 + 1.
    threshold: int | None = Field(None, ge=2)
    # With an automatic degree: the fraction of a cohort that may drop without losing the round.
    dropout_tolerance: float = Field(0.1, ge=0, lt=0.5)
    # Each element of a delta is clipped to [-clip, clip] before fixed-point encoding.
    clip: float = Field(1.0, gt=0)
    # A client's weight is min(examples, weight_cap) / weight_cap; the sum of weights travels masked too.
    weight_cap: int = Field(1000, gt=0)
    # Deadline of each protocol step (share keys, masked input, unmask) after training.
    phase_seconds: float = Field(60.0, gt=0)
    # A round whose sum cannot be recovered (too many dropouts) is retried this many times, then the job fails.
    max_attempts: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _works(self) -> SecureAggregationSpec:
        if self.threshold is not None and self.degree is None:
            raise ValueError("threshold needs an explicit degree")
        if self.degree is None:
            return self
        if self.degree % 2:
            raise ValueError(f"degree ({self.degree}) must be even")
        threshold = self.threshold if self.threshold is not None else self.degree // 2 + 1
        if threshold > self.degree:
            raise ValueError(f"threshold ({threshold}) is larger than degree ({self.degree})")
        if threshold <= self.degree // 2:
            raise ValueError(f"threshold ({threshold}) must be more than degree/2 ({self.degree // 2}), or the "
                             "coordinator could rebuild both masks of one client")
        return self

    def graph_for(self, n: int) -> tuple[int, int]:
        """(degree, threshold) for a cohort of ``n``.

        Automatic: threshold = degree/2 + 1 (the least that keeps 2*threshold > degree) and the
        smallest even degree >= 2 with degree - threshold >= ceil(dropout_tolerance * n), so any
        such share of the cohort may drop, even all in one neighbourhood; capped below n.
        """
        if self.degree is not None:
            return self.degree, self.threshold if self.threshold is not None else self.degree // 2 + 1
        need = math.ceil(self.dropout_tolerance * n)
        degree = 2
        while degree - (degree // 2 + 1) < need:
            degree += 2
        degree = min(degree, (n - 1) // 2 * 2)
        return degree, degree // 2 + 1


class PrivacySpec(_Strict):
    """Client-level central DP: updates clipped to clip_norm, Gaussian noise added once to the sum."""

    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    # Fraction of the population sampled per round; null: cohort / enrolled clients.
    sample_rate: float | None = Field(None, gt=0, le=1)


class OffsiteSpec(_Strict):
    """Offsite tuning (Xiao et al. 2023): clients get an emulator, never the full weights."""

    # The first and last blocks are the adapter clients tune; a subset of the middle is kept.
    adapter_layers: tuple[int, int] = (2, 2)
    keep: float | None = Field(None, gt=0, le=1)
    keep_layers: int | None = Field(None, ge=1)
    # A prebuilt emulator (`fedtune emulator build`); otherwise one is built at job creation.
    emulator: str | None = None
    distill_data: str | None = None
    distill_steps: int = Field(0, ge=0)
    prune: str | None = None
    quantize: Literal["int8", "nf4"] | None = None
    # What clients train on the adapter blocks: LoRA on their target modules, or every parameter of
    # the blocks (as the Offsite-Tuning paper does; the update is then the size of the blocks).
    tune: Literal["lora", "blocks"] = "lora"

    @model_validator(mode="after")
    def _one_size(self) -> OffsiteSpec:
        if self.adapter_layers[0] < 0 or self.adapter_layers[1] < 0 or sum(self.adapter_layers) < 1:
            raise ValueError(f"adapter_layers {list(self.adapter_layers)} must be two counts, at least one block in all")
        if self.keep is not None and self.keep_layers is not None:
            raise ValueError("set only one of offsite.keep and offsite.keep_layers")
        return self


class ResourcesSpec(_Strict):
    """What a job reserves on a Ray coordinator for its engine, aggregation and evaluation: its quota.

    Jobs whose reservations do not fit wait in the queue (by priority, then age)."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    # Ray memory reservation for evaluation and aggregation; null: none.
    memory_gb: float | None = Field(None, gt=0)


class JobSpec(_Strict):
    """A federated tuning job."""

    name: str = Field("job", min_length=1, max_length=128)
    base_model: str = Field("tiny-llama", min_length=1)
    mode: Literal["federated", "offsite"] = "federated"
    offsite: OffsiteSpec | None = None
    # A hub revision (branch, tag or commit) of base_model, pinned for the job's life.
    base_revision: str | None = Field(None, min_length=1)
    # Clients load the base (or emulator) quantized with bitsandbytes and train LoRA on top (QLoRA);
    # allowed: each client chooses (fedtune client run --quantize nf4|int8), full precision otherwise.
    client_quantization: Literal["nf4", "int8", "allowed"] | None = None
    peft: PeftSpec = Field(default_factory=default_peft)
    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec.model_validate({}))
    data: DataSpec = Field(default_factory=lambda: DataSpec.model_validate({}))
    aggregation: AggregationSpec = Field(default_factory=lambda: AggregationSpec.model_validate({}))
    evaluation: EvaluationSpec = Field(default_factory=lambda: EvaluationSpec.model_validate({}))
    # fp32, fp16, bf16, int8, int4, int2, topk:FRACTION, topk:FRACTION+int8|int4 (fedtune.compression.codecs)
    codec: str = "fp32"
    rounds: int = Field(3, gt=0, le=100000)
    clients_per_round: int = Field(3, gt=0)
    min_clients: int = Field(2, gt=0)
    round_deadline_seconds: float = Field(600.0, gt=0)
    # Once min_clients are connected, how long to wait for clients_per_round before starting.
    cohort_wait_seconds: float = Field(10.0, ge=0)
    eval_data: str | None = None
    secure_aggregation: SecureAggregationSpec | None = None
    privacy: PrivacySpec | None = None
    # Scheduling on a Ray coordinator: higher priority starts first; waiting raises it over time.
    priority: int = Field(0, ge=-100, le=100)
    resources: ResourcesSpec = Field(default_factory=lambda: ResourcesSpec.model_validate({}))

    @classmethod
    def stored(cls, text: str) -> JobSpec:
        """A job's spec as the coordinator stored it (JSON), validated when the job was created.

        The codec checks, which need the codec implementations (and so torch), are skipped, so a job
        engine can read its spec without importing torch.
        """
        return cls.model_validate_json(text, context={_STORED: True})

    @model_validator(mode="after")
    def _cohort_fits(self, info: ValidationInfo) -> JobSpec:
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"min_clients ({self.min_clients}) is larger than clients_per_round ({self.clients_per_round})"
            )
        if self.offsite is not None and self.offsite.quantize and self.client_quantization:
            raise ValueError("offsite.quantize and client_quantization both quantize the model clients get; "
                             "set one")
        if self.mode == "federated" and self.tunes_blocks:
            raise ValueError("offsite.tune: blocks needs mode: offsite (a federated job has no adapter blocks)")
        if self.mode == "federated" and self.offsite is not None:
            raise ValueError("offsite settings are given but mode is federated; set mode: offsite")
        if self.tunes_blocks and self.client_quantization:
            raise ValueError(f"offsite.tune: blocks trains the adapter blocks' own weights, which "
                             f"client_quantization {self.client_quantization} would quantize; drop one")
        if self.tunes_blocks and self.peft != default_peft():
            raise ValueError("peft settings have no effect with offsite.tune: blocks (no LoRA is added); "
                             "remove them or use tune: lora")
        self._method_fits()
        why = self.aggregation.build().refusal(self)
        if why:
            raise ValueError(f"aggregation.strategy {self.aggregation.strategy}: {why}")
        if self.aggregation.mode == "async" and self.secure_aggregation is not None:
            raise ValueError("aggregation.mode async: secure aggregation masks one cohort's updates together and "
                             "unmasks only their sum, and asynchronous updates arrive one by one from different "
                             "versions; use mode: sync with it")
        if self.aggregation.mode == "async" and self.buffer > self.min_clients:
            raise ValueError(f"aggregation.async.buffer ({self.buffer}) is more than min_clients "
                             f"({self.min_clients}): each client adds at most one update per version, so a version "
                             "could wait for clients the job does not require")
        if self.aggregation.mode == "async" and self.privacy is not None:
            raise ValueError("aggregation.mode async: the DP accountant counts synchronous rounds with a planned "
                             "cohort; use mode: sync with privacy")
        codec = None
        if not (info.context and info.context.get(_STORED)):  # a stored spec's codec was checked at creation
            from fedtune.compression.codecs import get_codec

            try:
                codec = get_codec(self.codec)
            except InvalidInput as e:
                raise ValueError(f"codec: {e}") from None
        sa = self.secure_aggregation
        if sa is not None:
            if codec is not None and not codec.additive:
                raise ValueError(f"codec {self.codec} is not additive: secure aggregation encodes fp32 deltas "
                                 "in fixed point itself; use codec: fp32")
            if self.min_clients < 3:
                raise ValueError(f"secure aggregation needs min_clients of at least 3, got {self.min_clients}")
            if sa.degree is not None and sa.degree >= self.min_clients:
                raise ValueError(f"secure_aggregation.degree ({sa.degree}) must be below min_clients "
                                 f"({self.min_clients}): every cohort needs that many neighbours per client")
        return self

    def _method_fits(self) -> None:
        method = get_method(self.peft.method)
        name = method.name
        why = method.refusal(self.peft, self)
        if why:
            raise ValueError(f"peft.method {name}: {why}")
        if self.mode == "offsite" and not self.tunes_blocks and not method.blocks:
            raise ValueError(f"peft.method {name} cannot be confined to offsite tuning's adapter blocks "
                             "(peft has no layers_to_transform for it); use lora, loha, lokr, vera, bitfit "
                             "or bottleneck")
        if self.client_quantization and not method.quantized_base:
            raise ValueError(f"client_quantization {self.client_quantization}: peft cannot train {name} on a "
                             "bitsandbytes-quantized base; use lora, ia3 or a prompt method, or drop it")
        if self.training.packing and method.prompt:
            raise ValueError(f"training.packing: peft.method {name} prepends virtual tokens to each sequence, "
                             "which would then be shared by every packed example; turn packing off")
        if "exact_match" in self.evaluation.metrics and not method.generates and not self.tunes_blocks:
            raise ValueError(f"evaluation.metrics exact_match: peft cannot generate with peft.method {name} (its "
                             "generate() does not decode what the tuned model computes); drop exact_match or "
                             "use another method")
        mode = self.aggregation.lora
        if mode != "factors" and not method.lora:
            raise ValueError(f"aggregation.lora {mode} is for peft.method lora, not {name}")
        if self.secure_aggregation is not None and mode in ("exact", "fedsa"):
            raise ValueError(f"aggregation.lora {mode} is not a sum of what clients send, and secure aggregation "
                             "reveals only the sum; use ffa (exact and additive) or factors")
        if self.privacy is not None and mode == "exact":
            raise ValueError("aggregation.lora exact re-factors the mean product by SVD, which the DP noise on "
                             "the clipped sum does not bound; use ffa or factors with privacy")
        if self.tunes_blocks and mode != "factors":
            raise ValueError("aggregation.lora applies to LoRA; offsite.tune: blocks trains no LoRA")

    @property
    def buffer(self) -> int:
        """Async mode: updates per new version (``aggregation.async.buffer``, else min_clients)."""
        return self.aggregation.async_.buffer or self.min_clients

    @property
    def tunes_blocks(self) -> bool:
        """Whether clients train the adapter blocks themselves rather than LoRA on them."""
        return self.offsite is not None and self.offsite.tune == "blocks"


def _path(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "peft" and parts[1] in METHODS:
        del parts[1]  # the union's tag: peft.r, not peft.lora.r
    return ".".join(parts)


def _describe(err: ValidationError) -> str:
    errors = err.errors()
    # Every unknown key at once: a user fixing a spec by hand should not meet them one per run.
    unknown = list(dict.fromkeys(_path(e["loc"]) for e in errors if e["type"] == "extra_forbidden"))
    if len(unknown) > 1:
        rest = [e for e in errors if e["type"] != "extra_forbidden"]
        also = f"; also {_describe_one(rest[0]).removeprefix('job spec: ')}" if rest else ""
        return f"job spec: unknown keys {', '.join(unknown)}{also}"
    return _describe_one(errors[0])


def _describe_one(first: Any) -> str:
    loc = _path(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if loc and msg.startswith(loc + "."):
        loc = ""  # the message names its own key (aggregation.options.beta1: ...)
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "unknown_method" and isinstance(first.get("input"), dict):
        loc += ".method"
        msg = f"unknown PEFT method {first['input'].get('method')!r}; known: {', '.join(METHODS)}"
    return f"job spec: {loc}: {msg}" if loc else f"job spec: {msg}"


def parse_spec(text: str, *, base_dir: Path | None = None) -> JobSpec:
    """Parses and validates a YAML job spec.

    Args:
        text: The YAML document.
        base_dir: When given, relative local paths (``eval_data``, a local ``base_model``) are
            made absolute against it, so a spec next to its data works from any working directory.

    Raises:
        InvalidInput: naming every unknown key, else the first bad value.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidInput(f"job spec is not valid YAML: {str(e).splitlines()[0]}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidInput("job spec must be a YAML mapping of keys to values")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise InvalidInput(_describe(e)) from e
    if base_dir is not None:
        updates: dict[str, object] = {}
        if spec.eval_data and not Path(spec.eval_data).is_absolute():
            updates["eval_data"] = str((base_dir / spec.eval_data).resolve())
        if spec.offsite is not None:
            off: dict[str, str] = {}
            for key in ("emulator", "distill_data"):
                value = getattr(spec.offsite, key)
                if value and not Path(value).is_absolute():
                    off[key] = str((base_dir / value).resolve())
            if off:
                updates["offsite"] = spec.offsite.model_copy(update=off)  # type: ignore[assignment]
        local_base = base_dir / spec.base_model
        if not Path(spec.base_model).is_absolute() and local_base.is_dir():
            updates["base_model"] = str(local_base.resolve())
        if updates:
            spec = spec.model_copy(update=updates)
    return spec


def spec_to_yaml(spec: JobSpec) -> str:
    """Dumps a spec back to YAML (what the coordinator stores and re-validates)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


EXAMPLE_SPEC = """\
# fedtune job spec. Unknown keys are errors. Create with: fedtune job create THIS.yaml
name: my-job
# A built-in preset (tiny-llama; tiny-qwen2, -qwen3, -mistral, -gemma, -gemma2, -gemma3,
# -phi3, -gpt2, -opt), a local model directory, or a hub id that AutoModelForCausalLM loads.
# Module options left null (peft.target_modules) become the base family's defaults at creation.
base_model: {base}
mode: federated            # or offsite: clients get an emulator, never the full weights
# offsite:                 # with mode: offsite
#   adapter_layers: [2, 2] # first and last blocks clients tune
#   tune: lora             # LoRA on them, or blocks: every weight of them (no peft settings then)
#   keep: 0.5              # fraction of the middle blocks the emulator keeps
#   quantize: null         # int8 or nf4 for the emulator's frozen middle
# base_revision: null      # a hub base: pin a branch, tag or commit
# client_quantization: nf4 # QLoRA: clients load the base/emulator in nf4 or int8 (allowed: each chooses)
{peft}training:                  # each client's local training, per round
  steps: 20                # or epochs: 1.0 (set exactly one)
  lr: 0.003
  batch_size: 8            # examples per optimizer step (the effective batch)
  gradient_accumulation_steps: 1   # micro-batches per step (a client may pick its own --micro-batch)
  max_seq_len: 128
  seed: 0
  lr_scheduler: constant   # constant, linear or cosine, over the job's global steps
  warmup_steps: null       # or warmup_ratio: 0.03
  weight_decay: 0.01
  max_grad_norm: 1.0
  gradient_checkpointing: false
  precision: auto          # auto, fp32, bf16, fp16 (autocast; the base is loaded in that type)
  packing: false           # pack short examples into max_seq_len sequences
data:                      # how examples are read and rendered, the same on every client
  chat_template: auto      # auto, tokenizer, default (ChatML), or a Jinja template
  system_prompt: null
  pairs_as_chat: false     # render prompt/response and alpaca records as a chat turn
  too_long: truncate       # or drop: examples longer than max_seq_len
  # prompt: question       # column mapping: the data's name for prompt, response, text,
  # response: answer       #   instruction, input, output, messages or conversations
aggregation:
  strategy: fedavg         # fedtune job init --list-strategies: fedavgm, fedadam, fedyogi, fedadagrad,
                           # fedprox, scaffold, fedmedian, fedtrimmedavg, krum, multikrum, bulyan
  options: {{}}              # the strategy's own: fedadam {{server_lr: 0.01, beta1: 0.9, beta2: 0.99,
                           # tau: 0.001}}, fedprox {{mu: 0.01}}, krum {{byzantine: 1}}, ...
  mode: sync               # or async: a new version every async.buffer updates (FedBuff)
  # async: {{buffer: null, staleness_exponent: 0.5, max_staleness: null}}  # buffer null: min_clients
  max_update_norm: null    # reject updates with a larger L2 norm
{lora_aggregation}codec: fp32                # fp32, fp16, bf16, int8, int4, int2, topk:0.05, topk:0.5+int4 (lossy: error feedback)
rounds: 3
clients_per_round: 3
min_clients: 2             # a round closes at its deadline with at least this many updates
round_deadline_seconds: 600
cohort_wait_seconds: 10    # with min_clients connected, wait this long for clients_per_round
eval_data: null            # data file on the coordinator (any format), evaluated after every round
evaluation:
  metrics: [loss, perplexity]  # also token_accuracy, exact_match, choice_accuracy
  clients: false           # federated evaluation on clients' held-out data (client run --eval-fraction)
  every: 1                 # rounds between client evaluations (and the last)
# secure_aggregation:      # SecAgg+: the coordinator sees only the cohort's sum
#   dropout_tolerance: 0.1 # share of a cohort that may drop (sets degree and threshold)
#   clip: 1.0              # per-element range of a delta in fixed point
# privacy:                 # client-level central DP (clip, Gaussian noise on the sum)
#   clip_norm: 1.0
#   noise_multiplier: 1.0
#   delta: 1.0e-5
priority: 0                # Ray coordinator: higher starts first (-100..100); waiting jobs age upwards
resources:                 # Ray coordinator: the job's quota for its engine, aggregation, evaluation
  cpus: 1
  gpus: 0
  memory_gb: null
"""


def example_spec(base: str = "tiny-llama", method: str = "lora") -> str:
    """The commented example printed by ``fedtune job init`` (``--method`` picks its peft section).

    Raises:
        InvalidInput: ``method`` is not a registered PEFT method.
    """
    unit = get_method(method)
    lora = ("  lora: factors            # LoRA: factors (FedAvg of A and B), exact (mean of B·A, re-factored\n"
            "                           # by SVD), ffa (A frozen, B only: half the bytes), fedsa (B stays local)\n"
            if unit.lora else "")
    # str.format parses only the template: the method's YAML may hold braces of its own ({}).
    return EXAMPLE_SPEC.format(base=base, peft=unit.example, lora_aggregation=lora)


def method_list() -> str:
    """One line per registered PEFT method, for ``fedtune job init --list-methods``."""
    width = max(len(n) for n in METHODS)
    return "".join(f"{name:<{width}}  {m.family:<15}  {m.summary}\n" for name, m in METHODS.items())
