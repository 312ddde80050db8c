"""`fedtune serve` as a real process, spoken to with OpenAI's own Python client.

The adapters are published the way a coordinator publishes them (`publish_adapter` signed with the
state dir's coordinator key, recorded in its SQLite state, tagged through the registry), with random
LoRA weights large enough that each adapter generates its own text; the server is the `fedtune`
CLI in a subprocess on a port it picks. What it returns is checked against plain peft.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import REPO, wait_until
from tests.publishing import Publisher

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPT = "The federation said"
KEY = "sk-serve-test-1"
TOKENS = 12


class Server:
    """A `fedtune serve` process on a port it picked."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDTUNE_LOG_LEVEL": "INFO"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fedtune", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=log.open("wb"), env=env, cwd=REPO, text=True)
        self.url = ""

    def wait_ready(self) -> Server:
        """Waits for the URL line the server prints once it serves."""
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout=180)
        if not got or not got[0].startswith("http://"):
            self.proc.kill()
            raise AssertionError(f"fedtune serve did not print its URL:\n{self.log.read_text()[-3000:]}")
        self.url = got[0].strip()
        return self

    def client(self, key: str | None = KEY) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self) -> int:
        self.proc.terminate()
        return self.wait()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


@dataclass
class World:
    """The published adapters, the bases and the two servers."""

    pub: Publisher
    chat_base: Path
    plain_base: Path
    a: str  # job with rounds 1 and 2 (+3 published later), tag production
    b: str
    c: str  # on the plain preset: another base
    e: str  # five rounds, for eight distinct adapters
    tampered: str
    forged: str
    server: Server
    pulled: Path
    public_key: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedtune.models import TINY_PRESET, load_tokenizer, materialize_preset
    from fedtune.serving.server import coordinator_public_key

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    state_dir = root / "coord"
    plain_base = materialize_preset(TINY_PRESET, state_dir / "models" / "presets" / TINY_PRESET)
    # The same weights with a chat template: another base (its hash differs).
    chat_base = root / "chat-base"
    shutil.copytree(plain_base, chat_base)
    tok = load_tokenizer(chat_base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat_base)
    pub = Publisher(state_dir)
    public_key = coordinator_public_key(state_dir)
    pulled = root / "pulled"
    pulled.mkdir()
    (root / "keys.txt").write_text(f"# API keys\n{KEY}\n")
    (root / "coordinator.pub").write_text(public_key + "\n")

    # The server starts now (importing torch and loading the base take it seconds) while the
    # adapters are published: it finds them on the first request.
    server = Server(["--state-dir", str(state_dir), "--base", str(chat_base), "--api-key", "other-key",
                     "--api-key", KEY, "--max-adapters", "8", "--max-concurrent", "8", "--max-body-bytes", "65536"],
                    root / "serve.log")
    a, b, e = pub.job(chat_base, "alpha"), pub.job(chat_base, "beta"), pub.job(chat_base, "epsilon")
    c = pub.job(plain_base, "gamma")
    tampered, forged = pub.job(chat_base, "tampered"), pub.job(chat_base, "forged")
    pub.publish(a, 1, seed=11)
    pub.publish(a, 2, seed=12)
    pub.publish(b, 1, seed=21)
    for r in range(1, 6):
        pub.publish(e, r, seed=50 + r)
    pub.publish(c, 1, seed=31)
    pub.state.tags.set(a, 1, "production")
    bad = pub.publish(tampered, 1, seed=41) / "adapter_model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0x55  # one bit pattern in the last tensor's bytes: still loads, no longer what was signed
    bad.write_bytes(bytes(data))
    pub.publish(forged, 1, seed=42, signer=Ed25519PrivateKey.generate())
    shutil.copytree(state_dir / "adapters" / c / "round-1", pulled / "gamma")  # as `adapters pull` leaves it
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    yield World(pub, chat_base, plain_base, a, b, c, e, tampered, forged, server, pulled, public_key)
    code = server.stop()
    pub.state.close()
    assert code == 0, (root / "serve.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def pulled_server(world: World) -> Iterator[Server]:
    """`fedtune serve --adapters` over pulled adapter dirs, on the plain preset (no chat template)."""
    from fedtune.models import TINY_PRESET

    root = world.pulled.parent
    server = Server(["--adapters", str(world.pulled), "--base", TINY_PRESET, "--cache-dir", str(root / "cache"),
                     "--public-key", str(root / "coordinator.pub"), "--api-key-file", str(root / "keys.txt"),
                     "--request-timeout", "5"], root / "pulled.log")
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


# ---------------------------------------------------------------------- plain peft, the reference
def _prompt_ids(base: Path, prompt: str, chat: bool = False) -> list[int]:
    tok = _base(base)[1]
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(prompt)["input_ids"])


@functools.cache
def _base(base: Path) -> tuple[Any, Any]:
    from fedtune.models import load_causal_lm, load_tokenizer

    return load_causal_lm(base, torch.device("cpu"), torch.float32), load_tokenizer(base)


@functools.cache
def peft_greedy(base: Path, adapter: Path | None, prompt: str, tokens: int = TOKENS, chat: bool = False) -> str:
    """What plain transformers + peft generate greedily in fp32."""
    from peft import PeftModel

    model, tok = _base(base)
    model = copy.deepcopy(model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = torch.tensor([_prompt_ids(base, prompt, chat)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def adapter_dir(w: World, job: str, rnd: int) -> Path:
    return w.pub.state_dir / "adapters" / job / f"round-{rnd}"


def assert_served(reply: Any, model: str) -> None:
    """A completion came back from ``model`` (sampled: its text may be empty when it drew the end token)."""
    assert reply.model == model and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1


def error_of(e: Any) -> dict[str, Any]:
    """The ``error`` object of an API error response (OpenAI's shape, checked)."""
    body = e.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---------------------------------------------------------------------- tests
def test_models_lists_every_servable_adapter_by_round_and_tag_and_the_base(world: World) -> None:
    ids = {m.id for m in world.server.client().models.list().data}
    w = world
    assert {"base", f"{w.a}@1", f"{w.a}@2", f"{w.a}@production", f"{w.b}@1", f"{w.e}@5"} <= ids
    assert f"{w.c}@1" not in ids  # trained on another base than this server's


def test_greedy_completions_equal_plain_peft_for_two_rounds_another_job_and_the_base(world: World) -> None:
    w, client = world, world.server.client()
    cases = [(f"{w.a}@1", adapter_dir(w, w.a, 1)), (f"{w.a}@2", adapter_dir(w, w.a, 2)),
             (f"{w.b}@1", adapter_dir(w, w.b, 1)), ("base", None)]
    texts = {}
    for model, path in cases:
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
        assert reply.model == model
        assert reply.choices[0].text == peft_greedy(w.chat_base, path, PROMPT), model
        assert reply.usage.prompt_tokens == len(_prompt_ids(w.chat_base, PROMPT))
        assert 0 < reply.usage.completion_tokens <= TOKENS
        texts[model] = reply.choices[0].text
    assert len(set(texts.values())) == len(cases), texts  # each adapter really changes the answer
    # The tag and the bare job resolve, and the reply names the round served.
    tagged = client.completions.create(model=f"{w.a}@production", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert (tagged.model, tagged.choices[0].text) == (f"{w.a}@1", texts[f"{w.a}@1"])


def test_streaming_and_chat_give_the_same_text_as_plain_peft(world: World) -> None:
    w, client = world, world.server.client()
    model = f"{w.b}@1"
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": PROMPT}]
    expected = peft_greedy(w.chat_base, adapter_dir(w, w.b, 1), PROMPT, chat=True)
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected
    assert chat.usage.prompt_tokens == len(_prompt_ids(w.chat_base, PROMPT, chat=True))
    streamed = list(client.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS,
                                                   temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    # The raw stream is OpenAI's: data lines ending with [DONE].
    with httpx.stream("POST", f"{w.server.url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "base", "prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_sampling_parameters_are_honoured(world: World) -> None:
    client, model = world.server.client(), f"{world.a}@2"
    kwargs = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 1.0, "top_p": 0.9}
    sampled = [client.completions.create(seed=seed, **kwargs).choices[0].text for seed in (7, 8, 9)]
    assert [client.completions.create(seed=seed, **kwargs).choices[0].text for seed in (7, 8, 9)] == sampled
    assert len(set(sampled)) > 1  # it samples: other seeds, other texts
    greedy = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    stop = greedy.choices[0].text[3:5]
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text and greedy.choices[0].text.startswith(stopped.choices[0].text)
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == TOKENS


def test_eight_adapters_in_flight_at_once_all_answer_as_peft_would_in_shared_batches(world: World) -> None:
    w = world
    models = [(w.a, 1), (w.a, 2), (w.b, 1), *((w.e, r) for r in range(1, 6))]
    client = w.server.client()
    for job, rnd in models:  # loaded first, so that the eight then run side by side
        client.completions.create(model=f"{job}@{rnd}", prompt=PROMPT, max_tokens=1)
    before = w.server.metrics()
    tokens = 24

    def ask(job_round: tuple[str, int]) -> str:
        job, rnd = job_round
        return client.completions.create(model=f"{job}@{rnd}", prompt=PROMPT, max_tokens=tokens,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(models)) as pool:
        texts = list(pool.map(ask, models))
    for (job, rnd), text in zip(models, texts, strict=True):
        assert text == peft_greedy(w.chat_base, adapter_dir(w, job, rnd), PROMPT, tokens), f"{job}@{rnd}"
    after = w.server.metrics()
    passes = after[("fedtune_serve_batch_size_count", ())] - before.get(("fedtune_serve_batch_size_count", ()), 0)
    single = (after[("fedtune_serve_batch_size_bucket", (("le", "1.0"),))]
              - before.get(("fedtune_serve_batch_size_bucket", (("le", "1.0"),)), 0))
    assert passes > single, "no forward pass carried more than one request"
    assert after[("fedtune_serve_adapters_resident", ())] == 8


def test_a_round_published_after_start_is_served_and_the_least_recently_used_adapter_leaves(world: World) -> None:
    w, client = world, world.server.client()
    for model in (f"{w.a}@1", f"{w.a}@2", f"{w.b}@1", *(f"{w.e}@{r}" for r in range(1, 6))):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=1)
    assert f"{w.a}@3" not in {m.id for m in client.models.list().data}
    path = w.pub.publish(w.a, 3, seed=13)
    assert f"{w.a}@3" in {m.id for m in client.models.list().data}
    latest = client.completions.create(model=w.a, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert latest.model == f"{w.a}@3"
    assert latest.choices[0].text == peft_greedy(w.chat_base, path, PROMPT)
    # Nine adapters used, eight resident: a@1, used longest ago, left and comes back on demand.
    assert httpx.get(f"{w.server.url}/health").json()["adapters_resident"] == 8
    again = client.completions.create(model=f"{w.a}@1", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert again.choices[0].text == peft_greedy(w.chat_base, adapter_dir(w, w.a, 1), PROMPT)
    assert "evicted" in w.server.log.read_text()


def test_moving_a_tag_changes_what_it_serves_without_a_restart(world: World) -> None:
    w, client = world, world.server.client()
    ask = lambda: client.completions.create(model=f"{w.a}@production", prompt=PROMPT, max_tokens=TOKENS,
                                            temperature=0)
    assert ask().model == f"{w.a}@1"
    w.pub.state.tags.set(w.a, 2, "production")
    try:
        moved = ask()
        assert moved.model == f"{w.a}@2"
        assert moved.choices[0].text == peft_greedy(w.chat_base, adapter_dir(w, w.a, 2), PROMPT)
        assert f"{w.a}@production" in {m.id for m in client.models.list().data}
    finally:
        w.pub.state.tags.set(w.a, 1, "production")  # rollback: moving it back


def test_adapters_that_do_not_verify_are_refused_with_the_reason_and_the_rest_is_served(world: World) -> None:
    w, client = world, world.server.client()
    refusals = [(w.tampered, "does not match its sha256"), (w.forged, "signed by another key"),
                (w.c, "trained on another base")]
    for job, reason in refusals:
        for _ in range(2):  # the second time from the remembered failure
            with pytest.raises(openai.UnprocessableEntityError) as info:
                client.completions.create(model=f"{job}@1", prompt=PROMPT, max_tokens=2)
            err = error_of(info.value)
            assert reason in err["message"] and err["code"] == "adapter_verification_failed", err
    log = w.server.log.read_text()
    assert all(reason in log for _, reason in refusals)
    assert not {f"{w.tampered}@1", f"{w.forged}@1"} & {m.id for m in client.models.list().data}
    assert_served(client.completions.create(model=f"{w.b}@1", prompt=PROMPT, max_tokens=2), f"{w.b}@1")


def test_bad_requests_get_openai_errors_and_the_server_stays_up(world: World) -> None:
    w, client = world, world.server.client()
    model = f"{w.a}@2"
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model=f"{w.a}@99", prompt=PROMPT)
    assert error_of(nf.value)["code"] == "model_not_found" and "round" in error_of(nf.value)["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=model, prompt="x" * 300, max_tokens=4)
    assert error_of(long.value)["code"] == "context_length_exceeded"
    assert error_of(long.value)["param"] == "prompt"
    for max_tokens in (0, -1, 10_000):
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens)
        assert error_of(bad.value)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as temp:
        client.completions.create(model=model, prompt=PROMPT, temperature=5)
    assert error_of(temp.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[])
    # Keys: missing and wrong.
    with pytest.raises(openai.AuthenticationError):
        w.server.client("wrong-key").models.list()
    raw = httpx.post(f"{w.server.url}/v1/completions", json={"model": model, "prompt": PROMPT}, timeout=30)
    assert raw.status_code == 401 and "Authorization: Bearer" in raw.json()["error"]["message"]
    auth = {"Authorization": f"Bearer {KEY}"}
    # Malformed JSON, a body that is no object, and one over --max-body-bytes.
    broken = httpx.post(f"{w.server.url}/v1/completions", content=b'{"model": "base", "prompt": ', headers=auth)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert httpx.post(f"{w.server.url}/v1/chat/completions", content=b"[1]", headers=auth).status_code == 400
    big = httpx.post(f"{w.server.url}/v1/completions", headers=auth,
                     json={"model": model, "prompt": "x" * 70_000, "max_tokens": 1})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    # Still serving.
    assert httpx.get(f"{w.server.url}/health").json()["status"] == "ok"
    assert_served(client.completions.create(model=model, prompt=PROMPT, max_tokens=2), model)


def test_too_many_requests_get_429_with_retry_after_and_abandoned_requests_free_their_slot(world: World) -> None:
    w, client = world, world.server.client()
    auth = {"Authorization": f"Bearer {KEY}"}
    health = f"{w.server.url}/health"
    host, port = w.server.url.removeprefix("http://").split(":")
    # --max-concurrent 8: eight clients still sending their bodies hold every slot.
    slow = [socket.create_connection((host, int(port)), timeout=30) for _ in range(8)]
    try:
        for conn in slow:
            conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\": ".encode())
        wait_until(lambda: httpx.get(health).json()["requests_in_flight"] == 8, 30, what="eight slow requests")
        busy = httpx.post(f"{w.server.url}/v1/completions", headers=auth,
                          json={"model": "base", "prompt": PROMPT, "max_tokens": 2})
    finally:
        for conn in slow:
            conn.close()
    assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["error"]["type"] == "rate_limit_error"
    # Gone (hung up), they free their slots; so does a client that leaves a stream half read.
    wait_until(lambda: httpx.get(health).json()["requests_in_flight"] == 0, 30, what="the slots")
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{w.server.url}/v1/completions", json=body, headers=auth, timeout=60) as r:
        next(r.iter_lines())
    wait_until(lambda: httpx.get(health).json()["requests_in_flight"] == 0, 30, what="the abandoned stream's slot")
    assert_served(client.completions.create(model="base", prompt=PROMPT, max_tokens=2), "base")


@pytest.mark.slow
def test_pulled_adapters_are_served_over_a_preset_base_with_a_key_file(world: World, pulled_server: Server) -> None:
    w, client = world, pulled_server.client()
    assert {m.id for m in client.models.list().data} == {"base", f"{w.c}@1"}
    reply = client.completions.create(model=w.c, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert reply.model == f"{w.c}@1"
    assert reply.choices[0].text == peft_greedy(w.plain_base, w.pulled / "gamma", PROMPT)
    with pytest.raises(openai.BadRequestError) as info:  # the preset's tokenizer has no chat template
        client.chat.completions.create(model=w.c, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert error_of(info.value)["code"] == "chat_template_missing"
    with pytest.raises(openai.AuthenticationError):
        pulled_server.client("not-in-the-file").completions.create(model=w.c, prompt=PROMPT)
    # --request-timeout 5: a body that never completes is answered 408 (and the slot freed).
    host, port = pulled_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\": ".encode())
        answer = b""
        while b"}}" not in answer and (chunk := conn.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"timeout"' in answer, answer
    # An adapter pulled into the folder while the server runs is served without a restart.
    shutil.copytree(w.pub.publish(w.c, 2, seed=32), w.pulled / "gamma-2")
    assert f"{w.c}@2" in {m.id for m in client.models.list().data}
    latest = client.completions.create(model=w.c, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert latest.model == f"{w.c}@2"
    assert latest.choices[0].text == peft_greedy(w.plain_base, w.pulled / "gamma-2", PROMPT)


def test_metrics_count_requests_tokens_and_time_to_first_token(world: World) -> None:
    w, client = world, world.server.client()
    model = f"{w.b}@1"
    ok, missing = ("fedtune_serve_requests_total", (("model", model), ("status", "200"))), \
        ("fedtune_serve_requests_total", (("model", "unknown"), ("status", "404")))
    completion = ("fedtune_serve_tokens_total", (("kind", "completion"),))
    prompt = ("fedtune_serve_tokens_total", (("kind", "prompt"),))
    ttft = ("fedtune_serve_time_to_first_token_seconds_count", ())
    before = w.server.metrics()
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody@1", prompt=PROMPT)
    after = w.server.metrics()
    assert after[ok] - before.get(ok, 0) == 1
    assert after[missing] - before.get(missing, 0) == 1
    assert after[completion] - before[completion] == reply.usage.completion_tokens
    assert after[prompt] - before[prompt] == reply.usage.prompt_tokens
    assert after[ttft] - before.get(ttft, 0) == 1
    assert 1 <= after[("fedtune_serve_adapters_resident", ())] <= 8


def test_cli_refuses_bad_setups_naming_the_fix(world: World) -> None:
    from fedtune.cli.main import app
    from fedtune.errors import FedtuneError
    from tests.conftest import fedtune_cmd

    state_dir, pulled = str(world.pub.state_dir), str(world.pulled)
    _host, port = world.server.url.removeprefix("http://").split(":")
    empty = world.pulled.parent / "no-keys.txt"
    empty.write_text("# nobody yet\n")
    # As a process: a taken port is one line on stderr and the conflict exit code, before any model loads.
    taken = fedtune_cmd("serve", "--state-dir", state_dir, "--base", str(world.chat_base), "--port", port)
    assert taken.returncode == 6 and "pick another --port" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1, taken.stderr
    cases = {
        "either --state-dir": ("--state-dir", state_dir, "--adapters", pulled),
        "pick one with --base": ("--state-dir", state_dir),  # two bases are published there
        "--public-key is needed": ("--adapters", pulled, "--base", "tiny-llama"),
        "neither a file nor a base64 key": ("--adapters", pulled, "--base", "tiny-llama", "--public-key", "nope!"),
        "holds no key": ("--state-dir", state_dir, "--api-key-file", str(empty)),
        "not a coordinator's state dir": ("--state-dir", pulled),
    }
    for message, args in cases.items():
        with pytest.raises(FedtuneError, match=message) as info:
            app(args=["serve", *args], standalone_mode=False)
        assert info.value.exit_code == 3
    assert httpx.get(f"{world.server.url}/health").status_code == 200
