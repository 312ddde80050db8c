"""The SecAgg+ neighbor graph: who masks with and holds shares for whom.

The participants ``0..n-1`` are shuffled with a permutation drawn from a public seed and placed on a
ring; each is joined to the ``degree // 2`` nearest on either side (a Harary graph). An odd degree
adds the diametrically opposite participant, which exists only when ``n`` is even, so odd degree
with odd ``n`` is refused (no ``degree``-regular graph exists then). The result is symmetric,
exactly ``degree``-regular, and identical on the coordinator and every client: the shuffle uses
SHA-256 only, never a library RNG whose stream could change between versions.
"""

from __future__ import annotations

import hashlib
import struct

from fedtune.errors import InvalidInput

_DOMAIN = b"fedtune-secagg/v1|graph|"


def neighbor_graph(n: int, degree: int, seed: bytes) -> tuple[frozenset[int], ...]:
    """Builds the neighbor sets of ``n`` participants.

    Args:
        n: Number of participants, >= 2.
        degree: Neighbors per participant, 1 <= degree < n; odd only when ``n`` is even.
        seed: Public randomness all parties share (the round id).

    Returns:
        ``graph[i]`` is the set of participant i's neighbors; ``j in graph[i]`` iff ``i in graph[j]``.

    Raises:
        InvalidInput: If no ``degree``-regular graph on ``n`` participants exists.
    """
    check_degree(n, degree)
    order = _permutation(n, seed)
    edges: list[set[int]] = [set() for _ in range(n)]
    offsets = list(range(1, degree // 2 + 1))
    if degree % 2:
        offsets.append(n // 2)
    for pos, v in enumerate(order):
        for off in offsets:
            for w in (order[(pos + off) % n], order[(pos - off) % n]):
                edges[v].add(w)
                edges[w].add(v)
    return tuple(frozenset(e) for e in edges)


def check_degree(n: int, degree: int) -> None:
    """Raises InvalidInput naming the bad value if ``degree`` does not fit ``n`` participants."""
    if n < 2:
        raise InvalidInput(f"need at least 2 participants, got n={n}")
    if not 1 <= degree < n:
        raise InvalidInput(f"degree must be in [1, n-1={n - 1}], got {degree}")
    if degree % 2 and n % 2:
        raise InvalidInput(f"odd degree={degree} needs an even number of participants, got n={n}")


def _permutation(n: int, seed: bytes) -> list[int]:
    """A Fisher-Yates shuffle of 0..n-1 driven by SHA-256 in counter mode."""
    counter = 0

    def below(bound: int) -> int:
        nonlocal counter
        # Rejection sampling keeps the draw exactly uniform.
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            digest = hashlib.sha256(_DOMAIN + seed + struct.pack(">Q", counter)).digest()
            counter += 1
            value = int.from_bytes(digest[:8], "big")
            if value < limit:
                return value % bound

    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order
