"""Batched multi-adapter generation: one frozen base, many adapters, continuous batching, a KV cache.

Requests for different LoRA adapters share each forward pass of the base: every row goes through
its own adapter (`fedtune.batching.MultiLoraModel.route_rows`, the BatchLoRA routing of batched
training, gathered per row), and the base alone rides along with a zero delta. Adapters of other
methods (IA3, LoHa, ...) cannot share a pass: each gets its own batch over a structural copy of the
base that shares its weights (nothing is duplicated in memory). A background thread runs the decode
loop: between two decode steps, waiting requests join their batch (prefilled together) and finished
or cancelled ones leave it.

    engine = GenerationEngine(base_model, tokenizer)
    engine.add_adapter("job@3", Path("adapters/job/round-3"))
    engine.start()
    for event in engine.submit(tokenizer("Hello")["input_ids"], "job@3", SamplingParams(temperature=0)):
        print(event.text, end="")
"""

from __future__ import annotations

import asyncio
import collections
import copy
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedtune.errors import InvalidInput, LimitExceeded, NotFound
from fedtune.serving.batch import RunningBatch
from fedtune.serving.sampling import CompletionText, SamplingParams, choose_tokens, make_generator

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedtune.batching import MultiLoraModel

__all__ = ["GenerationEngine", "RequestStream", "SamplingParams", "TokenEvent"]

logger = logging.getLogger(__name__)

SHARED = "shared"  # the batch of the base and every LoRA adapter
_TTFT_SAMPLES = 10_000  # time-to-first-token samples kept for `stats`


@dataclass(frozen=True)
class TokenEvent:
    """A piece of a request's completion.

    Attributes:
        text: New text since the previous event (stop strings cut, incomplete characters held back).
        token_ids: The tokens generated since the previous event.
        finish_reason: None while running; "stop" (a stop string or the end-of-text token),
            "length" (max_tokens or the context reached) or "error" on the last event.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None


class RequestStream:
    """The events of one request, for one consumer: iterate (blocking) or `events()` (asyncio).

    Attributes:
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated so far.
    """

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = threading.Event()
        self.finished = False

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self.completion_tokens += len(event.token_ids)
            self.finished = event.finish_reason is not None
            self._events.append(event)
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, flag in wakers:
            loop.call_soon_threadsafe(flag.set)

    def _ended(self) -> bool:
        return self._cancelled.is_set() and not self._events

    def __iter__(self) -> Iterator[TokenEvent]:
        """Yields events as they come, until the one with a finish reason (or a cancel)."""
        while True:
            with self._cond:
                while not self._events and not self._cancelled.is_set():
                    self._cond.wait()
                if self._ended():
                    return
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Like iterating, without blocking the event loop."""
        flag = asyncio.Event()
        waker = (asyncio.get_running_loop(), flag)
        with self._cond:
            self._wakers.append(waker)
        try:
            while True:
                flag.clear()  # before looking, so that a push after the look sets it again
                with self._cond:
                    if self._ended():
                        return
                    event = self._events.popleft() if self._events else None
                if event is None:
                    await flag.wait()
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            with self._cond:
                self._wakers.remove(waker)

    def cancel(self) -> None:
        """The client went away: the request leaves its batch before the next decode step."""
        self._cancelled.set()
        with self._cond:
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, flag in wakers:
            loop.call_soon_threadsafe(flag.set)

    @property
    def cancelled(self) -> bool:
        """Whether `cancel` was called."""
        return self._cancelled.is_set()


@dataclass
class _Adapter:
    """A loaded adapter: which batch serves it and its name there."""

    name: str
    lane: str
    route: str | None  # MultiLoraModel name in the shared batch; None in its own batch
    users: int = 0  # requests waiting or running
    retired: bool = False  # removed or replaced: deleted once its last request is done


@dataclass
class _Request:
    prompt_ids: list[int]
    adapter: _Adapter | None
    params: SamplingParams
    stream: RequestStream
    text: CompletionText
    generator: torch.Generator | None
    submitted: float = field(default_factory=time.perf_counter)
    generated: int = 0


@dataclass
class _Lane:
    """One batch and the requests waiting to join it."""

    batch: RunningBatch
    waiting: collections.deque[_Request] = field(default_factory=collections.deque)
    running: list[_Request] = field(default_factory=list)


class GenerationEngine:
    """Serves many adapters over one frozen base with batched, KV-cached, continuous decoding.

    Args:
        base_model: The causal LM, in eval mode (LoRA layers are injected into it in place).
        tokenizer: Its tokenizer, for detokenization and the end-of-text token.
        max_batch: Most rows in one batch.
        max_context: Most tokens of a prompt plus its completion (default and ceiling: the base's
            ``max_position_embeddings``).
        max_queue: Most requests waiting to join a batch; `submit` refuses more.
        max_prefill_tokens: Most tokens (rows times the longest prompt) prefilled in one pass when
            requests join; a longer single prompt is prefilled alone. Bounds the attention memory of
            a burst of long prompts.
        metrics_hook: Called from the decode thread as ``hook(name, value)`` with ("batch_size",
            rows of a forward pass), ("tokens", tokens generated by it) and ("ttft_seconds", time
            from submit to a request's first token); for a metrics exporter.
    """

    def __init__(self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_batch: int = 32,
                 max_context: int | None = None, max_queue: int = 256, max_prefill_tokens: int = 8192,
                 metrics_hook: Callable[[str, float], None] | None = None) -> None:
        if max_batch < 1:
            raise InvalidInput(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise InvalidInput(f"max_queue must not be negative, got {max_queue}")
        config = base_model.config.get_text_config(decoder=True)
        ceiling = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if max_context is not None and max_context < 2:
            raise InvalidInput(f"max_context must be at least 2 tokens, got {max_context}")
        self.max_context: int = min(c for c in (max_context, ceiling) if c) if (max_context or ceiling) else 2048
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self._base = base_model.eval()
        self._tokenizer = tokenizer
        self._num_layers = int(config.num_hidden_layers)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = base_model.generation_config.eos_token_id if base_model.generation_config else None
        eos_ids = eos if isinstance(eos, list) else [eos]
        self._eos = {int(t) for t in [*eos_ids, tokenizer.eos_token_id] if t is not None}
        embeddings: Any = base_model.get_input_embeddings()
        self._vocab = int(embeddings.num_embeddings)
        # Taken before any LoRA layer goes in: other methods' batches are built on copies of it.
        self._pristine = _weight_sharing_copy(base_model)
        self._multi: MultiLoraModel | None = None
        self._lanes: dict[str, _Lane] = {SHARED: _Lane(self._new_batch(base_model, self._route_shared))}
        self._adapters: dict[str, _Adapter] = {}
        self._retired: list[_Adapter] = []
        self._lane_ids = itertools.count()
        self._cond = threading.Condition()  # guards adapters, lanes' queues and the stop flag
        self._model_lock = threading.Lock()  # held while a model runs or is changed
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._hook = metrics_hook
        self._stats: dict[str, Any] = {"batch_sizes": collections.Counter(), "tokens_generated": 0,
                                       "requests_finished": 0, "forward_passes": 0,
                                       "ttft_seconds": collections.deque(maxlen=_TTFT_SAMPLES)}

    # -- adapters -------------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter_dir: Path) -> None:
        """Loads a peft adapter directory under `name` (replacing one of that name: requests
        already accepted finish on the old weights).

        Plain LoRA on Linear layers joins the shared batch; other methods get a batch of their own.

        Raises:
            InvalidInput: The directory does not hold a peft adapter that fits the base (nothing changes).
        """
        from peft import LoraConfig, PeftConfig
        from safetensors.torch import load_file

        if not name:
            raise InvalidInput("an adapter needs a non-empty name")
        try:
            config = PeftConfig.from_pretrained(str(adapter_dir))
        except (OSError, ValueError, TypeError) as e:
            raise InvalidInput(f"cannot read a peft adapter config in {adapter_dir}: {e}") from e
        weights = Path(adapter_dir) / "adapter_model.safetensors"
        try:
            state = load_file(str(weights))
        except (OSError, ValueError) as e:
            raise InvalidInput(f"cannot read the adapter weights {weights}: {e}") from e
        # Base tensors saved beside the adapter (peft saves the output layer when LoRA targets it).
        changed = self._changed_base_tensors(state)
        adapter: _Adapter | None = None
        if isinstance(config, LoraConfig) and not config.modules_to_save and not changed:
            try:
                own = {key: value for key, value in state.items() if key not in self._base_keys(state)}
                adapter = self._add_shared(name, config, own)
            except InvalidInput as e:
                # A LoRA the routing cannot take (DoRA, an Embedding target...) runs in its own batch.
                logger.info("adapter %s cannot share the base's batch (%s); it gets its own", name, e)
        if adapter is None:
            adapter = self._add_own(name, config, Path(adapter_dir), changed)
        with self._cond:
            old = self._adapters.get(name)
            self._adapters[name] = adapter
            if old is not None:
                old.retired = True
                self._retired.append(old)
            self._cond.notify_all()
        logger.info("adapter %s loaded from %s (%s batch)", name, adapter_dir,
                    "shared" if adapter.lane == SHARED else "its own")

    def _add_shared(self, name: str, config: Any, state: dict[str, torch.Tensor]) -> _Adapter:
        from fedtune.batching import AdapterSpec, MultiLoraModel

        spec = AdapterSpec(SHARED, config, state=state)
        with self._model_lock:
            if self._multi is None:
                self._multi = MultiLoraModel(self._base, SHARED, [spec], name_width=6)
                route = self._multi.names[0]
            else:
                route = self._multi.add_adapter(spec)
        return _Adapter(name, SHARED, route)

    def _base_keys(self, state: dict[str, torch.Tensor]) -> dict[str, str]:
        """Saved keys that name a tensor of the base itself -> that tensor's name in the base."""
        params = dict(self._pristine.named_parameters())
        found = {}
        for key in state:
            name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if name in params:
                found[key] = name
        return found

    def _changed_base_tensors(self, state: dict[str, torch.Tensor]) -> set[str]:
        """Names of base tensors that the adapter's file holds with other values than the base."""
        params = dict(self._pristine.named_parameters())
        return {name for key, name in self._base_keys(state).items()
                if params[name].shape != state[key].shape
                or not torch.equal(params[name].detach().cpu(), state[key].to(params[name].dtype))}

    def _add_own(self, name: str, config: Any, adapter_dir: Path, changed: set[str]) -> _Adapter:
        from peft import PeftModel, PeftType

        if config.is_prompt_learning and config.peft_type not in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
            raise InvalidInput(f"adapter {name}: {config.peft_type} adapters cannot be served; prompt tuning, "
                               "P-tuning and the non-prompt methods can")
        model = _weight_sharing_copy(self._pristine)
        for param_name in changed:
            # peft writes these into the base's tensors: this copy gets its own, the shared base stays as it is.
            module_name, _, attr = param_name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach().clone(), requires_grad=False))
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise InvalidInput(f"cannot load adapter {name} from {adapter_dir} onto the base: {e}") from e
        peft_model.eval()
        prefix = None
        forward: Any
        if config.is_prompt_learning:
            # Virtual tokens: the same embeddings before every prompt; the model itself is the base.
            with torch.no_grad():
                prefix = peft_model.get_prompt(batch_size=1)[0].detach()
            if prefix.shape[0] + 1 >= self.max_context:
                raise InvalidInput(f"adapter {name}: its {prefix.shape[0]} virtual tokens fill the context "
                                   f"of {self.max_context}")
            forward = peft_model.base_model
        else:
            forward = peft_model.base_model.model  # the transformers model with peft's layers injected
        lane = f"own-{next(self._lane_ids)}"
        with self._cond:
            # Its own batch: every row through this adapter.
            self._lanes[lane] = _Lane(RunningBatch(forward, lambda routes: nullcontext(), self._num_layers,
                                                   self._pad_id, prefix))
        return _Adapter(name, lane, None)

    def remove_adapter(self, name: str) -> None:
        """Unloads an adapter; requests already accepted for it still finish.

        Raises:
            NotFound: No adapter has this name.
        """
        with self._cond:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise NotFound(f"no adapter named {name!r} is loaded")
            adapter.retired = True
            self._retired.append(adapter)
            self._cond.notify_all()

    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        with self._cond:
            return sorted(self._adapters)

    # -- requests -------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> RequestStream:
        """Queues a request; its events come on the returned stream.

        Args:
            prompt_ids: The prompt's tokens (the base's tokenizer).
            adapter: A loaded adapter's name, or None for the base alone.
            params: Sampling settings.

        Raises:
            InvalidInput: An empty prompt, a token outside the vocabulary, or a prompt that leaves
                no room in the context.
            NotFound: No adapter has this name.
            LimitExceeded: `max_queue` requests are already waiting (retry later).
        """
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidInput("the prompt is empty; send at least one token")
        if len(prompt) >= self.max_context:
            raise InvalidInput(f"the prompt has {len(prompt)} tokens but the context holds {self.max_context}, "
                               "prompt and completion together; shorten the prompt")
        bad = [t for t in prompt if not 0 <= t < self._vocab]
        if bad:
            raise InvalidInput(f"prompt token {bad[0]} is outside the vocabulary of {self._vocab} tokens")
        stream = RequestStream(len(prompt))
        with self._cond:
            entry = None
            if adapter is not None:
                entry = self._adapters.get(adapter)
                if entry is None:
                    known = ", ".join(sorted(self._adapters)) or "none"
                    raise NotFound(f"no adapter named {adapter!r} is loaded (loaded: {known})")
            waiting = sum(len(lane.waiting) for lane in self._lanes.values())
            if waiting >= self.max_queue:
                raise LimitExceeded(f"{waiting} requests are already waiting (max_queue {self.max_queue}); retry later")
            lane = self._lanes[entry.lane if entry else SHARED]
            if len(prompt) + lane.batch.virtual_tokens >= self.max_context:
                raise InvalidInput(f"the prompt has {len(prompt)} tokens and adapter {adapter!r} puts "
                                   f"{lane.batch.virtual_tokens} virtual tokens before it, but the context holds "
                                   f"{self.max_context}; shorten the prompt")
            request = _Request(prompt, entry, params, stream, CompletionText(self._tokenizer, params.stop),
                               make_generator(params))
            if entry is not None:
                entry.users += 1
            lane.waiting.append(request)
            self._cond.notify_all()
        return stream

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for metrics: ``batch_sizes`` (rows of a forward pass -> passes), ``forward_passes``,
        ``tokens_generated``, ``requests_finished``, ``ttft_seconds`` (recent samples),
        ``requests_waiting``, ``requests_running``, ``adapters`` (servable), ``adapters_resident``
        (in memory: servable plus removed ones still finishing requests) and ``batches`` (the shared
        batch plus one per adapter that cannot share it)."""
        with self._cond:
            return {"batch_sizes": dict(self._stats["batch_sizes"]),
                    "forward_passes": self._stats["forward_passes"],
                    "tokens_generated": self._stats["tokens_generated"],
                    "requests_finished": self._stats["requests_finished"],
                    "ttft_seconds": list(self._stats["ttft_seconds"]),
                    "requests_waiting": sum(len(lane.waiting) for lane in self._lanes.values()),
                    "requests_running": sum(len(lane.running) for lane in self._lanes.values()),
                    "adapters": len(self._adapters),
                    "adapters_resident": len(self._adapters) + len(self._retired),
                    "batches": len(self._lanes)}

    # -- the decode loop ------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the decode-loop thread (once)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="fedtune-decode", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the decode loop; unfinished requests end with finish reason "error"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:
            self._thread = None
            for lane in self._lanes.values():
                for request in [*lane.running, *lane.waiting]:
                    self._finish(request, TokenEvent("", (), "error"))
                lane.running.clear()
                lane.waiting.clear()
                lane.batch.keep([])

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._stopping and not self._idle_retired()
                       and not any(lane.waiting or lane.running for lane in self._lanes.values())):
                    self._cond.wait()
                if self._stopping:
                    return
                lanes = [lane for lane in self._lanes.values() if lane.waiting or lane.running]
            self._drop_retired()
            for lane in lanes:
                try:
                    with self._model_lock, torch.inference_mode():
                        self._advance(lane)
                except Exception:  # a failed pass must not kill the loop: its requests end with "error"
                    logger.exception("a decode step failed; its %d requests end with an error", len(lane.running))
                    with self._cond:
                        for request in lane.running:
                            self._finish(request, TokenEvent("", (), "error"))
                        lane.running.clear()
                    lane.batch.keep([])

    def _advance(self, lane: _Lane) -> None:
        """One iteration of a lane: drop cancelled rows, let waiting requests join, one decode step."""
        self._leave(lane, [i for i, r in enumerate(lane.running) if not r.stream.cancelled])
        with self._cond:
            joiners: list[_Request] = []
            longest = 0
            while lane.waiting and len(lane.running) + len(joiners) < self.max_batch:
                request = lane.waiting[0]
                if request.stream.cancelled:
                    self._finish(lane.waiting.popleft(), None)
                    continue
                # Prefill pads every joiner to the longest prompt: keep the padded total in budget.
                longer = max(longest, len(request.prompt_ids) + lane.batch.virtual_tokens)
                if joiners and longer * (len(joiners) + 1) > self.max_prefill_tokens:
                    break
                joiners.append(lane.waiting.popleft())
                longest = longer
        for group in _similar_lengths(joiners):
            first = lane.batch.size
            lane.running.extend(group)
            logits = lane.batch.join([r.prompt_ids for r in group], [self._route_of(r) for r in group])
            self._count_pass(len(group))
            self._emit(lane, logits, first)
        if lane.running:
            self._count_pass(lane.batch.size)
            self._emit(lane, lane.batch.step(), 0)

    def _emit(self, lane: _Lane, logits: torch.Tensor, first: int) -> None:
        """Samples the next token of rows ``first`` onwards, hands out their events, drops finished rows."""
        rows = lane.running[first:]
        tokens = choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        lane.batch.set_last(tokens, first)
        now = time.perf_counter()
        done = set()
        for i, (request, token) in enumerate(zip(rows, tokens, strict=True), first):
            request.generated += 1
            if request.generated == 1:
                self._observe("ttft_seconds", now - request.submitted)
            reason = None
            if token in self._eos:
                reason = "stop"
            elif (request.generated >= request.params.max_tokens
                  or len(request.prompt_ids) + lane.batch.virtual_tokens + request.generated >= self.max_context):
                reason = "length"
            text, stopped = request.text.add(token, final=reason is not None)
            if stopped:
                reason = "stop"
            event = TokenEvent(text, (token,), reason)
            if reason is None:
                request.stream._push(event)
            else:
                done.add(i)
                with self._cond:
                    self._finish(request, event)
        with self._cond:
            self._stats["tokens_generated"] += len(rows)
        if self._hook:
            self._hook("tokens", float(len(rows)))
        if done:
            self._leave(lane, [i for i in range(len(lane.running)) if i not in done])

    def _leave(self, lane: _Lane, keep: list[int]) -> None:
        if len(keep) == len(lane.running):
            return
        with self._cond:
            for i in set(range(len(lane.running))) - set(keep):
                if not lane.running[i].stream.finished:
                    self._finish(lane.running[i], None)  # cancelled
        lane.running = [lane.running[i] for i in keep]
        lane.batch.keep(keep)

    def _finish(self, request: _Request, event: TokenEvent | None) -> None:
        """Ends a request (under the condition lock): its last event, its adapter's use count."""
        if event is not None:
            request.stream._push(event)
        self._stats["requests_finished"] += 1
        if request.adapter is not None:
            request.adapter.users -= 1

    def _idle_retired(self) -> list[_Adapter]:
        return [a for a in self._retired if a.users == 0]

    def _drop_retired(self) -> None:
        """Deletes removed or replaced adapters whose last request is done."""
        with self._cond:
            idle = self._idle_retired()
            for adapter in idle:
                self._retired.remove(adapter)
                if adapter.lane != SHARED:
                    self._lanes.pop(adapter.lane, None)
        for adapter in idle:
            if adapter.lane == SHARED:
                assert self._multi is not None and adapter.route is not None
                with self._model_lock:
                    self._multi.remove_adapter(adapter.route)
            logger.info("adapter %s unloaded", adapter.name)

    def _route_of(self, request: _Request) -> str | None:
        return request.adapter.route if request.adapter else None

    def _route_shared(self, routes: Any) -> Any:
        if self._multi is None:
            return nullcontext()
        return self._multi.route_rows(routes)

    def _new_batch(self, model: Any, route: Any) -> RunningBatch:
        return RunningBatch(model, route, self._num_layers, self._pad_id)

    def _count_pass(self, rows: int) -> None:
        with self._cond:
            self._stats["batch_sizes"][rows] += 1
            self._stats["forward_passes"] += 1
        if self._hook:
            self._hook("batch_size", float(rows))

    def _observe(self, name: str, value: float) -> None:
        with self._cond:
            self._stats[name].append(value)
        if self._hook:
            self._hook(name, value)


def _similar_lengths(requests: list[_Request], waste: float = 0.25) -> list[list[_Request]]:
    """Splits joiners into prefill groups of similar prompt length, so that padding adds at most
    `waste` of a group's real tokens (the CPU spends as much on a padded token as on a real one)."""
    groups: list[list[_Request]] = []
    real = 0
    for request in sorted(requests, key=lambda r: len(r.prompt_ids)):
        n = len(request.prompt_ids)
        if groups and n * (len(groups[-1]) + 1) <= (1 + waste) * (real + n):
            groups[-1].append(request)
            real += n
        else:
            groups.append([request])
            real = n
    return groups


def _weight_sharing_copy(model: torch.nn.Module) -> Any:
    """A copy of the module tree whose parameters and buffers are the original's tensors."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)
