"""The admin RPCs over operator identities and the audit log (a part of AdminServicer).

Who may call them is in fedtune/coordinator/roles.py (all need ``admin``); the interceptor has
checked that before any of these runs.
"""

from __future__ import annotations

import grpc

from fedtune.coordinator.admin_access import AdminAccess, current_caller
from fedtune.coordinator.identities import LEGACY_NAME, AdminIdentity
from fedtune.coordinator.roles import Role, parse_role
from fedtune.coordinator.rpc_errors import unary
from fedtune.protos import fedtune_pb2 as pb

DEFAULT_AUDIT_LINES = 100


def identity_message(ident: AdminIdentity) -> pb.AdminIdentity:
    """The wire form of a stored identity (never its secret)."""
    return pb.AdminIdentity(name=ident.name, role=ident.role, kind=ident.kind, created_unix=ident.created,
                            created_by=ident.created_by, key_fingerprint=ident.key_fingerprint)


class IdentityRpcs:
    """AddAdmin, ListAdmins, RemoveAdmin and ReadAudit, over ``self.access``."""

    access: AdminAccess

    @unary
    def AddAdmin(self, request: pb.AddAdminRequest, context: grpc.ServicerContext) -> pb.AddAdminReply:
        role = parse_role(request.role)
        caller = current_caller()
        by = caller.who if caller is not None else "unknown"
        if request.public_key:
            ident = self.access.identities.add_key(request.name, role, request.public_key, by)
            return pb.AddAdminReply(identity=identity_message(ident))
        ident, token = self.access.identities.add_token(request.name, role, by)
        return pb.AddAdminReply(identity=identity_message(ident), token=token)

    @unary
    def ListAdmins(self, request: pb.ListAdminsRequest, context: grpc.ServicerContext) -> pb.ListAdminsReply:
        builtin = pb.AdminIdentity(name=LEGACY_NAME, role=str(Role.ADMIN), kind="admin-token",
                                   created_by="the coordinator (admin.token in its state dir)")
        return pb.ListAdminsReply(identities=[builtin, *map(identity_message, self.access.identities.list())])

    @unary
    def RemoveAdmin(self, request: pb.RemoveAdminRequest, context: grpc.ServicerContext) -> pb.AdminIdentity:
        return identity_message(self.access.identities.remove(request.name))

    @unary
    def ReadAudit(self, request: pb.ReadAuditRequest, context: grpc.ServicerContext) -> pb.ReadAuditReply:
        lines, truncated = self.access.audit.tail(request.limit or DEFAULT_AUDIT_LINES, request.who)
        return pb.ReadAuditReply(lines=lines, truncated=truncated)
