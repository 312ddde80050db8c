"""Operator roles and the one table that says which role each admin RPC needs.

Roles are ordered, ``viewer`` < ``operator`` < ``admin``, and a role may call everything a lower
one may. Every AdminService method needs an entry in :data:`ADMIN_RPC_ROLES`; a method missing
from it is refused for every caller (deny by default) with a message naming this table, so a new
RPC cannot be reached until someone has decided who may call it.
"""

from __future__ import annotations

from enum import IntEnum

from fedtune.errors import InvalidInput

ADMIN_SERVICE = "/fedtune.v1.AdminService/"


class Role(IntEnum):
    """An operator's role; a higher value includes every lower one."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()


# The required role of every AdminService RPC, by method name. Add each new admin RPC here.
ADMIN_RPC_ROLES: dict[str, Role] = {
    # Reads: status, reports, published adapters.
    "GetInfo": Role.VIEWER,
    "ListJobs": Role.VIEWER,
    "GetJob": Role.VIEWER,
    "ListAdapters": Role.VIEWER,
    "PullAdapter": Role.VIEWER,
    # Jobs and enrollment tokens.
    "CreateJob": Role.OPERATOR,
    "CancelJob": Role.OPERATOR,
    "CreateToken": Role.OPERATOR,
    "RevokeToken": Role.OPERATOR,
    # Registry tags of published adapters.
    "TagAdapter": Role.OPERATOR,
    "UntagAdapter": Role.OPERATOR,
    # Identities and the audit log.
    "AddAdmin": Role.ADMIN,
    "ListAdmins": Role.ADMIN,
    "RemoveAdmin": Role.ADMIN,
    "ReadAudit": Role.ADMIN,
}

ROLE_NAMES = tuple(str(r) for r in Role)


def parse_role(name: str) -> Role:
    """The role called ``name``.

    Raises:
        InvalidInput: no such role.
    """
    try:
        return Role[name.strip().upper()]
    except KeyError:
        raise InvalidInput(f"unknown role {name!r}: use one of {', '.join(ROLE_NAMES)}") from None


def method_name(method: str) -> str:
    """The short name of a full gRPC method path (``/fedtune.v1.AdminService/GetJob`` -> ``GetJob``)."""
    return method.rsplit("/", 1)[-1]


def required_role(method: str) -> Role | None:
    """The role an admin RPC needs (full path or short name), or None when it has no entry."""
    return ADMIN_RPC_ROLES.get(method_name(method))


def allows(role: Role, required: Role) -> bool:
    """Whether ``role`` may call an RPC that needs ``required``."""
    return role >= required
