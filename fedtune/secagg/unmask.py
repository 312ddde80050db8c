"""Removing the masks from the sum of masked inputs, once the unmask shares are in.

For a survivor ``i`` the server rebuilds its self-mask seed ``b_i`` and subtracts ``PRG(b_i)``. For a
client ``d`` that shared keys but sent no input, it rebuilds ``d``'s mask private key and removes the
pairwise mask every surviving neighbor added against ``d``, which no longer cancels. Pairwise masks
between two survivors cancel in the sum and are never computed.
"""

from __future__ import annotations

import logging

import numpy as np

from fedtune.errors import InvalidInput, PreconditionFailed
from fedtune.secagg import prg, shamir
from fedtune.secagg.protocol import KeyAdvert, SecAggParams, UnmaskRequest, UnmaskShares

logger = logging.getLogger(__name__)


def remove_masks(
    params: SecAggParams,
    adverts: dict[int, KeyAdvert],
    masked_sum: np.ndarray,
    mask_peers: dict[int, frozenset[int]],
    request: UnmaskRequest,
    answers: dict[int, UnmaskShares],
) -> np.ndarray:
    """The unmasked sum mod 2^32 of the survivors' inputs.

    Args:
        params: The round's parameters.
        adverts: Key adverts by client index.
        masked_sum: Sum mod 2^32 of the survivors' masked vectors (left unchanged).
        mask_peers: For each survivor, the neighbors it masked against (checked against the graph).
        request: The survivors and dropped clients every answer was given for.
        answers: Unmask shares by the survivor that sent them.

    Returns:
        A uint32 vector of ``vector_len`` elements.

    Raises:
        PreconditionFailed: If any secret has fewer than ``threshold`` shares (never a wrong sum).
        InvalidInput: If shares rebuild a mask key that does not match its advert.
    """
    t, length = params.threshold, params.vector_len
    b_points: dict[int, list[tuple[int, bytes]]] = {i: [] for i in request.survivors}
    sk_points: dict[int, list[tuple[int, bytes]]] = {d: [] for d in request.dropped}
    for holder in sorted(answers):
        # A share's Shamir x is its holder's index + 1 (see ClientSession.share_keys).
        for owner, share in answers[holder].b_shares.items():
            b_points[owner].append((holder + 1, share))
        for owner, share in answers[holder].sk_shares.items():
            sk_points[owner].append((holder + 1, share))
    short = [(f"self-mask seed of client {i}", len(p)) for i, p in sorted(b_points.items()) if len(p) < t]
    short += [(f"mask key of dropped client {d}", len(p)) for d, p in sorted(sk_points.items()) if len(p) < t]
    if short:
        what, have = short[0]
        more = f" ({len(short) - 1} more secrets are short too)" if len(short) > 1 else ""
        raise PreconditionFailed(
            f"too many clients dropped: cannot rebuild the {what}: {have} shares available, {t} needed{more}"
        )

    total = masked_sum.copy()
    for i, points in sorted(b_points.items()):
        np.subtract(total, prg.expand(shamir.combine(points, t), length), out=total)
    for d, points in sorted(sk_points.items()):
        sk = prg.private_from_bytes(shamir.combine(points, t))
        if prg.public_bytes(sk) != adverts[d].s_pk:
            raise InvalidInput(f"shares rebuild a mask key for client {d} that does not match its advert")
        for i in sorted(params.graph[d] & request.survivors):
            if d not in mask_peers[i]:
                continue
            seed = prg.agree(sk, adverts[i].s_pk, prg.MASK_LABEL, params.round_id, (i, d))
            # Survivor i added the mask if i < d and subtracted it otherwise: undo exactly that.
            if i < d:
                np.subtract(total, prg.expand(seed, length), out=total)
            else:
                np.add(total, prg.expand(seed, length), out=total)
    logger.debug("secagg unmasked %d survivors, %d dropped", len(request.survivors), len(request.dropped))
    return total
