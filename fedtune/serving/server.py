"""Starting `fedtune serve`: the base, the engine, the adapter pool, and uvicorn on a bound socket."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.adapters import MANIFEST
from fedtune.errors import InvalidInput, StateConflict
from fedtune.hashing import model_dir_hash

if TYPE_CHECKING:
    from fedtune.serving.adapters import AdapterSource

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ServeOptions:
    """Everything `fedtune serve` was asked for (see fedtune.cli.serve_cmd for each option's meaning)."""

    state_dir: Path | None
    adapter_dirs: tuple[Path, ...]
    base: str | None
    host: str
    port: int
    public_key: str | None
    api_keys: frozenset[str] = frozenset()
    max_adapters: int = 16
    max_batch: int = 32
    max_concurrent: int = 64
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0
    device: str = "auto"
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/fedtune").expanduser())


def coordinator_public_key(state_dir: Path) -> str:
    """The coordinator's signing key (base64 raw Ed25519), read from its state dir."""
    from fedtune.coordinator.keyring import signing_public_key

    return signing_public_key(state_dir, fix="; pass --public-key")


def read_public_key(value: str) -> str:
    """``--public-key``: the key itself (base64) or a file holding it."""
    text = Path(value).read_text().strip() if Path(value).is_file() else value.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise InvalidInput(f"--public-key: {value!r} is neither a file nor a base64 key ({e})") from e
    if len(raw) != 32:
        raise InvalidInput(f"--public-key: an Ed25519 key is 32 bytes, this one is {len(raw)}; "
                           "`fedtune coordinator key --state-dir DIR` prints the right one")
    return text


def default_base(state_dir: Path) -> str:
    """The base every adapter published in ``state_dir`` was trained on (the manifests must agree)."""
    bases = set()
    for manifest in (state_dir / "adapters").glob(f"*/round-*/{MANIFEST}"):
        try:
            bases.add(str(json.loads(manifest.read_text())["base_model"]))
        except (OSError, ValueError, KeyError):
            continue
    if not bases:
        raise InvalidInput(f"no adapter is published in {state_dir} yet, so there is no base to serve: "
                           "pass --base (adapters published later are picked up)")
    if len(bases) > 1:
        raise InvalidInput(f"the adapters in {state_dir} were trained on {len(bases)} different bases "
                           f"({', '.join(sorted(bases))}): pick one with --base")
    return bases.pop()


def _max_context(model: Any, tokenizer: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and 0 < length < 1_000_000 else 2048


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one), so the URL is known before serving starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StateConflict(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0 picks a free one)") \
            from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(options: ServeOptions) -> None:
    """Runs the server until SIGTERM or Ctrl-C; prints the bound URL alone on stdout once it is ready."""
    from fedtune.serving.adapters import DirsSource, StateDirSource

    # Everything a user can get wrong is checked before torch and the model load (seconds).
    source: AdapterSource
    if options.state_dir is not None:
        source = StateDirSource(options.state_dir)
        public_key = (read_public_key(options.public_key) if options.public_key
                      else coordinator_public_key(options.state_dir))
        base = options.base or default_base(options.state_dir)
        cache = options.state_dir / "models"
    else:
        dirs = DirsSource(options.adapter_dirs)
        dirs.check()
        source = dirs
        if options.public_key is None:
            raise InvalidInput("--public-key is needed to verify pulled adapters: the coordinator's key, from "
                               "`fedtune coordinator key --state-dir DIR` or `fedtune adapters list`")
        if options.base is None:
            raise InvalidInput("--base is needed with --adapters: the model dir, preset or hub id they were "
                               "trained on")
        public_key = read_public_key(options.public_key)
        base = options.base
        cache = options.cache_dir
    sock = bind(options.host, options.port)
    try:
        _run(options, source, public_key, base, cache, sock)
    finally:
        sock.close()


def _run(options: ServeOptions, source: AdapterSource, public_key: str, base: str, cache: Path,
         sock: socket.socket) -> None:
    import torch
    import uvicorn

    from fedtune.models import load_causal_lm, load_tokenizer, pick_device, resolve_base
    from fedtune.serving.adapters import AdapterPool
    from fedtune.serving.app import Runtime, ServeSettings, create_app
    from fedtune.serving.engine import GenerationEngine
    from fedtune.serving.metrics import ServeMetrics

    # Pulled adapters name the coordinator's path of the base; peft warns on every load that ours differs.
    warnings.filterwarnings("ignore", message="The PEFT config's `base_model_name_or_path` was renamed")
    base_dir = resolve_base(base, cache)
    base_hash = model_dir_hash(base_dir)
    device = pick_device(options.device)
    tokenizer = load_tokenizer(base_dir)
    # fp32 on the CPU (what plain peft gives); bf16/fp16 on a GPU, as the rest of fedtune loads it.
    model = load_causal_lm(base_dir, device, torch.float32 if device.type == "cpu" else None)
    max_context = _max_context(model, tokenizer)
    metrics = ServeMetrics()
    engine = GenerationEngine(model, tokenizer, max_batch=options.max_batch, max_context=max_context,
                              max_queue=max(options.max_concurrent, 1), metrics_hook=metrics.engine_hook)
    work_dir = Path(tempfile.mkdtemp(prefix="fedtune-serve-"))
    runtime: Runtime | None = None
    try:
        engine.start()
        settings = ServeSettings(max_context=max_context, api_keys=options.api_keys,
                                 max_body_bytes=options.max_body_bytes, request_timeout=options.request_timeout,
                                 max_concurrent=options.max_concurrent, base_name=base)
        pool = AdapterPool(engine, source, public_key=public_key, base_hash=base_hash,
                           max_adapters=options.max_adapters, work_dir=work_dir,
                           on_change=metrics.adapters_resident.set)
        runtime = Runtime(engine=engine, tokenizer=tokenizer, pool=pool, settings=settings, metrics=metrics)
        config = uvicorn.Config(create_app(runtime), log_config=None, access_log=False, timeout_graceful_shutdown=5,
                                lifespan="off")
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        log.info("serving %s (%s, %d-token context) on %s with adapters from %s", base, device, max_context,
                 f"{url_host}:{port}", options.state_dir or ", ".join(map(str, options.adapter_dirs)))
        print(f"http://{url_host}:{port}", flush=True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn stopped gracefully and re-raised the signal it caught
    finally:
        engine.stop()
        if runtime is not None:
            runtime.pool.close()
        shutil.rmtree(work_dir, ignore_errors=True)
