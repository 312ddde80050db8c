"""Domain errors shared by the coordinator, the client agent and the CLI.

Each error carries the gRPC status the servicer answers with and the exit code the CLI ends with,
so the mapping lives in one place and stays stable.
"""

from __future__ import annotations

import grpc


class ExitCode:
    """Stable process exit codes of the `fedtune` command."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    BAD_INPUT = 3
    AUTH = 4
    UNAVAILABLE = 5
    CONFLICT = 6
    INTERRUPTED = 130


class FedtuneError(Exception):
    """Base of all errors a user or a peer can cause."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    exit_code: int = ExitCode.INTERNAL


class InvalidInput(FedtuneError):
    """A request, file or spec is malformed (names the bad part)."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = ExitCode.BAD_INPUT


class NotFound(FedtuneError):
    """A job, artifact, round or adapter does not exist."""

    status = grpc.StatusCode.NOT_FOUND
    exit_code = ExitCode.BAD_INPUT


class PreconditionFailed(FedtuneError):
    """The request is well formed but does not fit the current state (closed round, other job)."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = ExitCode.CONFLICT


class AuthError(FedtuneError):
    """Missing, unknown, expired or revoked credentials."""

    status = grpc.StatusCode.UNAUTHENTICATED
    exit_code = ExitCode.AUTH


class PermissionDenied(FedtuneError):
    """Authenticated, but not allowed to touch this resource."""

    status = grpc.StatusCode.PERMISSION_DENIED
    exit_code = ExitCode.AUTH


class LimitExceeded(FedtuneError):
    """A message, stream or update is over the configured size limits."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = ExitCode.BAD_INPUT


class StateConflict(FedtuneError):
    """The coordinator cannot start on this state dir or address (version, lock, port in use)."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = ExitCode.CONFLICT


class Unavailable(FedtuneError):
    """The peer cannot be reached."""

    status = grpc.StatusCode.UNAVAILABLE
    exit_code = ExitCode.UNAVAILABLE


_BY_STATUS: dict[grpc.StatusCode, type[FedtuneError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(err: grpc.RpcError) -> FedtuneError:
    """Turns a failed call into the domain error the coordinator raised, for the CLI to report."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_STATUS.get(code, FedtuneError)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"coordinator unreachable: {details}"
    return cls(details or code.name)
