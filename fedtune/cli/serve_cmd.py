"""`fedtune serve`: published adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedtune.cli.emulator_cmd import default_cache_dir
from fedtune.errors import InvalidInput


def _api_keys(keys: list[str] | None, key_file: Path | None) -> frozenset[str]:
    found = [k.strip() for k in keys or [] if k.strip()]
    if key_file is not None:
        try:
            lines = key_file.read_text().splitlines()
        except OSError as e:
            raise InvalidInput(f"--api-key-file {key_file}: {e.strerror}") from e
        file_keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not file_keys:
            raise InvalidInput(f"--api-key-file {key_file} holds no key (one per line)")
        found += file_keys
    return frozenset(found)


def serve(
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="A coordinator's state dir: serve what it publishes, tags included.")] = None,
    adapters: Annotated[list[Path] | None, typer.Option(
        "--adapters", help="A pulled adapter dir, or a folder of them (repeatable); needs --base and --public-key.")]
    = None,
    base: Annotated[str | None, typer.Option(
        "--base", help="Base model: preset, model dir or hub id (default with --state-dir: the adapters' base).")]
    = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0 picks a free one).")] = 8000,
    max_adapters: Annotated[int, typer.Option(
        "--max-adapters", min=1, help="Adapters kept loaded; the least recently used leaves first.")] = 16,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="Accept this bearer key (repeatable); without any key the API is open.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        "--api-key-file", help="Accept the keys in this file, one per line.")] = None,
    public_key: Annotated[str | None, typer.Option(
        "--public-key", help="The coordinator's signing key (base64, or a file holding it) adapters must be "
        "signed by (default with --state-dir: its coordinator's).")] = None,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", min=1024, help="Largest request body accepted (413 above).")] = 1 << 20,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", min=0.1, help="Seconds one request may take, from arrival to its last token.")] = 300.0,
    max_concurrent: Annotated[int, typer.Option(
        "--max-concurrent", min=1, help="Generation requests in flight at once (429 with Retry-After above).")] = 64,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", min=1, help="Sequences decoded together in one forward pass of the base.")] = 32,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Where presets are materialized with --adapters (default: ~/.cache/fedtune).")] = None,
) -> None:
    """Serve published adapters (and the base alone, as model `base`) over an OpenAI-compatible API.

    Models are named JOB@ROUND, JOB@TAG or JOB (its latest round); each is verified against the
    coordinator's key before it is first used, and a newly published round or a moved tag is served
    without a restart. Prints the URL alone on stdout once it is ready; stops on SIGTERM or Ctrl-C.
    """
    from fedtune.registry import STATE_DB
    from fedtune.serving.server import ServeOptions
    from fedtune.serving.server import serve as run_server

    if (state_dir is None) == (not adapters):
        raise InvalidInput("pass either --state-dir (a coordinator's) or --adapters DIR (pulled adapters)")
    if state_dir is not None and not (state_dir / STATE_DB).is_file():
        raise InvalidInput(f"--state-dir {state_dir} is not a coordinator's state dir (no {STATE_DB}): pass the "
                           "directory `fedtune coordinator start --state-dir` was given")
    run_server(ServeOptions(
        state_dir=state_dir.resolve() if state_dir is not None else None,
        adapter_dirs=tuple(p.resolve() for p in adapters or ()),
        base=base, host=host, port=port, public_key=public_key, api_keys=_api_keys(api_key, api_key_file),
        max_adapters=max_adapters, max_batch=max_batch, max_concurrent=max_concurrent, max_body_bytes=max_body_bytes,
        request_timeout=request_timeout, device=device, cache_dir=cache_dir or default_cache_dir(),
    ))
