"""The `fedtune` command line (fedtune.cli.main is its entry point)."""

from __future__ import annotations

import itertools
import os
import sys


def is_fedtune_command() -> bool:
    """Whether this process is the `fedtune` command (the console script or `python -m fedtune`)."""
    if os.path.basename(sys.argv[0]) in ("fedtune", "fedtune.exe"):
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b == "fedtune" for a, b in itertools.pairwise(argv))


def quiet_grpc_logs() -> None:
    """Keeps gRPC's C-core log lines (``E1203 ... ssl_transport_security.cc``) off a user's terminal.

    The C core reads GRPC_VERBOSITY once, when grpc is imported, so this must run before anything
    imports grpc; fedtune's own errors say what went wrong. A user who set GRPC_VERBOSITY or
    GRPC_TRACE keeps their settings; library users of fedtune are not touched.
    """
    if not is_fedtune_command() or "GRPC_VERBOSITY" in os.environ or "GRPC_TRACE" in os.environ:
        return
    os.environ["GRPC_VERBOSITY"] = "NONE"
