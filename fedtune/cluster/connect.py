"""Connecting to Ray: an existing cluster (``--ray-address``) or a local one sized for a small machine.

Ray 2.60's ``ray start`` turns token authentication on and writes the token to
``~/.ray/auth_token``, but a Python driver only sends it when ``RAY_AUTH_MODE=token``; joining
such a cluster then fails after ~20 s of retries with an authentication error. Here, when a token
is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), it is used,
so the user never has to know. A local Ray gets no dashboard, no usage stats and its own short
temp dir (Ray's socket paths must stay under ~107 characters).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from fedtune.errors import AuthError, InvalidInput, Unavailable

log = logging.getLogger(__name__)

NAMESPACE = "fedtune"
# Ray appends ~62 characters (session_<date>_<pid>/sockets/plasma_store) to its temp dir.
_MAX_TEMP_DIR = 44
ENABLE_HINT = "pip install 'fedtune[ray]' to run jobs as Ray actors with quotas and a shared base"


def ray_installed() -> bool:
    """Whether Ray can be imported."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def import_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InvalidInput(f"this needs Ray: {ENABLE_HINT}") from None
    return ray


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def _refresh_ray_config() -> None:
    """Makes an already imported Ray see a changed RAY_AUTH_MODE (it caches its config)."""
    import sys

    if "ray" not in sys.modules:
        return
    try:
        from ray._raylet import Config  # type: ignore[attr-defined]
    except ImportError:  # not installed or another layout: the next import reads the environment
        return
    Config.initialize("")


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInput(f"--ray-address {address!r} is not HOST:PORT (the head's GCS address, e.g. 10.0.0.5:6379)")
    return host.strip("[]"), int(port)


def temp_dir_for(state_dir: Path) -> Path:
    """Ray's temp dir: under the state dir when the path is short enough, else a short one in /tmp."""
    wanted = (state_dir / "ray").resolve()
    if len(str(wanted)) <= _MAX_TEMP_DIR:
        return wanted
    return Path(tempfile.gettempdir()) / f"fedtune-ray-{hashlib.sha256(str(wanted).encode()).hexdigest()[:10]}"


def connect(address: str | None, state_dir: Path, *, num_cpus: int | None = None) -> Any:
    """Joins the Ray cluster at ``address``, or starts a local Ray for this process.

    Raises:
        InvalidInput: Ray is not installed or the address is malformed.
        Unavailable: nothing answers at ``address``.
        AuthError: the cluster refused the connection (token authentication).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # On a busy small machine the raylet can take longer than Ray's default 30 s to register.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "45")
    # Ray reads the mode when it is imported: decide it first. A local Ray gets token auth with the
    # user's token (Ray makes one if needed) without Ray's notice about it; a cluster is joined
    # with the token when there is one.
    if "RAY_AUTH_MODE" not in os.environ and (not address or _token_available()):
        os.environ["RAY_AUTH_MODE"] = "token"
        _refresh_ray_config()
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address:
        host, port = _split_address(address)
        # Ray retries an unreachable GCS for a long time; fail fast with the address named.
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as e:
            raise Unavailable(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None
        try:
            ray.init(address=f"{host}:{port}", namespace=NAMESPACE, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - Ray raises several unrelated types here; all are reported
            text = str(e) + str(e.__cause__ or "")
            if "Authentication" in text or "auth" in text.lower():
                raise AuthError(f"the Ray cluster at {address} refused fedtune's connection (token "
                                "authentication): put the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN") from None
            raise Unavailable(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        log.info("joined the Ray cluster at %s", address)
        return ray
    temp = temp_dir_for(state_dir)
    temp.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        try:
            ray.init(address="local", namespace=NAMESPACE, num_cpus=num_cpus or os.cpu_count() or 1,
                     include_dashboard=False, _temp_dir=str(temp), log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001 - Ray's start-up failures come as bare Exceptions
            # Seen on busy 2-core machines: a Ray helper process aborts at start and the raylet never
            # registers. A second start (a fresh session) is cheap insurance against that.
            ray.shutdown()
            if attempt == 2:
                raise Unavailable(f"cannot start a local Ray: {str(e).splitlines()[0]}") from None
            log.warning("local Ray did not start (%s); trying once more", str(e).splitlines()[0])
    log.info("started a local Ray (temp dir %s)", temp)
    return ray


def node_ip(ray: Any) -> str:
    """This process's Ray node's IP, as Ray reports it: where the cluster's other nodes reach this one."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return str(node["NodeManagerAddress"])
    raise Unavailable("this process's Ray node is not in the cluster's node list")
