"""SecAgg+: the coordinator gets the exact sum of the survivors' inputs, or a refusal, never one input."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Collection
from dataclasses import replace

import numpy as np
import pytest

from fedtune.errors import InvalidInput, PreconditionFailed
from fedtune.secagg import (
    ClientSession,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    SecAggParams,
    ServerSession,
    UnmaskRequest,
    UnmaskShares,
    decode_sum,
    encode,
    max_scale,
    shamir,
)
from fedtune.secagg.graph import neighbor_graph

N, DEGREE, THRESHOLD, LENGTH, CLIP = 10, 8, 5, 1000, 1.0
ROUND_ID = hashlib.sha256(b"job-1/round-3/nonce").digest()


def make_params(**overrides: object) -> SecAggParams:
    base = SecAggParams(N, DEGREE, THRESHOLD, CLIP, max_scale(CLIP, N), LENGTH, ROUND_ID)
    return replace(base, **overrides)  # type: ignore[arg-type]


def relay(msg):  # type: ignore[no-untyped-def]
    """Every message crosses the wire as bytes, as it will over gRPC."""
    return type(msg).from_bytes(msg.to_bytes())


def share_keys(params: SecAggParams) -> tuple[ServerSession, list[ClientSession]]:
    """Runs advertise and share_keys for every client."""
    server = ServerSession(params)
    clients = [ClientSession(params, i) for i in range(params.n_clients)]
    for c in clients:
        server.add_advert(relay(c.advertise()))
    for c in clients:
        server.add_shares(c.index, [relay(s) for s in c.share_keys(server.adverts_for(c.index))])
    return server, clients


def run_round(
    params: SecAggParams,
    encoded: list[np.ndarray],
    *,
    drop_before_input: Collection[int] = (),
    silent_at_unmask: Collection[int] = (),
) -> tuple[np.ndarray, UnmaskRequest]:
    """A whole round; clients in ``drop_before_input`` vanish right after share_keys."""
    server, clients = share_keys(params)
    for c in clients:
        if c.index not in drop_before_input:
            server.add_masked_input(relay(c.masked_input(encoded[c.index], server.shares_for(c.index))))
    request = relay(server.unmask_request())
    for c in clients:
        if c.index in request.survivors and c.index not in silent_at_unmask:
            server.add_unmask(relay(c.unmask(request.survivors, request.dropped)))
    return server.aggregate(), request


@pytest.fixture
def floats() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(scale=0.6, size=LENGTH).astype(np.float32) for _ in range(N)]


def encode_all(params: SecAggParams, floats: list[np.ndarray]) -> list[np.ndarray]:
    return [encode(x, params.clip, params.scale, rng=i) for i, x in enumerate(floats)]


def plain_sum(vectors: list[np.ndarray], who: frozenset[int]) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=np.uint32)
    for i in who:
        total += vectors[i]
    return total


def test_dropouts_after_share_keys_leave_exact_sum_of_survivors(floats: list[np.ndarray]) -> None:
    params = make_params()
    encoded = encode_all(params, floats)
    total, request = run_round(params, encoded, drop_before_input={1, 4, 7})
    assert request.dropped == {1, 4, 7} and len(request.survivors) == 7
    np.testing.assert_array_equal(total, plain_sum(encoded, request.survivors))
    clipped = sum(np.clip(floats[i].astype(np.float64), -CLIP, CLIP) for i in request.survivors)
    assert np.max(np.abs(decode_sum(total, params.scale) - clipped)) < len(request.survivors) / params.scale


def test_silent_survivors_at_unmask_are_tolerated_while_shares_suffice(floats: list[np.ndarray]) -> None:
    params = make_params()
    encoded = encode_all(params, floats)
    total, request = run_round(params, encoded, drop_before_input={0, 5}, silent_at_unmask={3})
    # Client 3 still counts: its input arrived and its neighbors rebuild its self-mask.
    assert 3 in request.survivors
    np.testing.assert_array_equal(total, plain_sum(encoded, request.survivors))


def test_too_many_dropouts_are_refused_not_summed_wrong(floats: list[np.ndarray]) -> None:
    encoded = encode_all(make_params(), floats)
    with pytest.raises(PreconditionFailed, match=r"too many clients dropped.*\d shares available, 5 needed"):
        run_round(make_params(), encoded, drop_before_input={0, 2, 4, 6, 8})
    with pytest.raises(
        PreconditionFailed, match="too many clients dropped: 4 masked inputs arrived, 5 needed"
    ):
        run_round(make_params(), encoded, drop_before_input={0, 1, 2, 3, 4, 5})


def test_sparse_graph_tolerates_degree_minus_threshold_dropouts(floats: list[np.ndarray]) -> None:
    params = make_params(degree=4, threshold=3)
    encoded = encode_all(params, floats)
    total, request = run_round(params, encoded, drop_before_input={9})
    np.testing.assert_array_equal(total, plain_sum(encoded, request.survivors))


def test_tampered_or_readdressed_share_fails_authentication() -> None:
    server, clients = share_keys(make_params())
    shares = server.shares_for(0)
    x = np.zeros(LENGTH, dtype=np.uint32)
    flipped = bytearray(shares[0].ciphertext)
    flipped[-1] ^= 1
    with pytest.raises(InvalidInput, match=f"share from client {shares[0].sender} failed authentication"):
        clients[0].masked_input(x, [EncryptedShare(shares[0].sender, 0, bytes(flipped)), *shares[1:]])
    # A share relabelled as coming from another neighbor must not open either.
    relabelled = EncryptedShare(shares[1].sender, 0, shares[0].ciphertext)
    with pytest.raises(InvalidInput, match="failed authentication"):
        clients[0].masked_input(x, [relabelled])
    # The failed attempts left the session usable with the genuine shares.
    assert clients[0].masked_input(x, shares).sender == 0


def test_masked_vector_of_wrong_length_is_rejected() -> None:
    server, clients = share_keys(make_params())
    masked = clients[0].masked_input(np.zeros(LENGTH, dtype=np.uint32), server.shares_for(0))
    with pytest.raises(InvalidInput, match=f"length {LENGTH - 1}, expected {LENGTH}"):
        server.add_masked_input(MaskedInput(0, masked.peers, masked.vector[:-1]))
    with pytest.raises(InvalidInput, match=f"uint32 vector of length {LENGTH}"):
        clients[1].masked_input(np.zeros(LENGTH + 1, dtype=np.uint32), server.shares_for(1))


def test_input_masked_against_a_lost_share_is_refused() -> None:
    server, clients = share_keys(make_params())
    masked = clients[0].masked_input(np.zeros(LENGTH, dtype=np.uint32), server.shares_for(0)[1:])
    with pytest.raises(InvalidInput, match="client 0 masked against"):
        server.add_masked_input(masked)


def test_messages_naming_unknown_clients_are_rejected() -> None:
    params = make_params()
    stranger = ClientSession(params, 0).advertise()
    server = ServerSession(params)
    with pytest.raises(InvalidInput, match="unknown client 42"):
        server.add_advert(KeyAdvert(42, stranger.c_pk, stranger.s_pk, ROUND_ID))
    server, clients = share_keys(params)
    server.shares_for(0)
    with pytest.raises(InvalidInput, match="unknown client 42"):
        server.add_masked_input(MaskedInput(42, frozenset(), np.zeros(LENGTH, dtype=np.uint32)))
    with pytest.raises(InvalidInput, match="client 42, which is not an advertised neighbor"):
        clients[0].masked_input(np.zeros(LENGTH, dtype=np.uint32), [EncryptedShare(42, 0, bytes(64))])

    server, clients = share_keys(params)
    for c in clients:
        server.add_masked_input(c.masked_input(np.zeros(LENGTH, dtype=np.uint32), server.shares_for(c.index)))
    request = server.unmask_request()
    answer = clients[0].unmask(request.survivors, request.dropped)
    with pytest.raises(InvalidInput, match="unknown client 42"):
        server.add_unmask(UnmaskShares(0, {42: b"x", **answer.b_shares}, {}))
    non_neighbor = next(j for j in range(N) if j not in params.graph[0] and j != 0)
    with pytest.raises(InvalidInput, match=f"share of client {non_neighbor}, which it was not asked for"):
        server.add_unmask(UnmaskShares(0, {non_neighbor: b"x"}, {}))


def test_shares_addressed_to_non_neighbors_are_rejected() -> None:
    params = make_params()
    server = ServerSession(params)
    clients = [ClientSession(params, i) for i in range(N)]
    for c in clients:
        server.add_advert(c.advertise())
    shares = clients[0].share_keys(server.adverts_for(0))
    non_neighbor = next(j for j in range(1, N) if j not in params.graph[0])
    with pytest.raises(InvalidInput, match="expected its neighbors"):
        server.add_shares(0, [*shares[1:], EncryptedShare(0, non_neighbor, shares[0].ciphertext)])
    with pytest.raises(InvalidInput, match="unknown client 42"):
        server.add_shares(0, [*shares[1:], EncryptedShare(0, 42, shares[0].ciphertext)])


def test_one_masked_vector_reveals_nothing_about_its_input(floats: list[np.ndarray]) -> None:
    params = make_params(vector_len=LENGTH * 20)
    x = np.tile(floats[0], 20)
    encoded = encode(x, CLIP, params.scale, rng=0)
    server, clients = share_keys(params)
    masked = clients[0].masked_input(encoded, server.shares_for(0)).vector
    assert np.mean(masked == encoded) < 0.001
    # Decoded alone it is noise over the whole sum range (+-N * CLIP), uncorrelated with x.
    decoded = decode_sum(masked, params.scale)
    assert np.median(np.abs(decoded - x)) > 2 * CLIP
    assert abs(np.corrcoef(decoded, x)[0, 1]) < 0.05
    quarters = np.bincount(masked >> 30, minlength=4) / len(masked)
    np.testing.assert_allclose(quarters, 0.25, atol=0.02)


def test_unmask_refuses_overlapping_sets_repeat_requests_and_too_few_survivors() -> None:
    server, clients = share_keys(make_params())
    for c in clients:
        server.add_masked_input(c.masked_input(np.zeros(LENGTH, dtype=np.uint32), server.shares_for(c.index)))
    everyone = set(range(N))
    with pytest.raises(PreconditionFailed, match=r"clients \[3\] as both survived and dropped"):
        clients[0].unmask(everyone, {3})
    with pytest.raises(PreconditionFailed, match="only 4 clients survived, 5 needed"):
        clients[0].unmask({0, 1, 2, 3}, {4, 5})
    clients[0].unmask(everyone, set())
    with pytest.raises(PreconditionFailed, match="already answered"):
        clients[0].unmask(everyone - {3}, {3})


def test_phases_close_and_late_messages_are_refused() -> None:
    server, clients = share_keys(make_params())
    for c in clients[:-1]:
        server.add_masked_input(c.masked_input(np.zeros(LENGTH, dtype=np.uint32), server.shares_for(c.index)))
    late = clients[-1].masked_input(np.zeros(LENGTH, dtype=np.uint32), server.shares_for(N - 1))
    assert server.unmask_request().dropped == {N - 1}
    with pytest.raises(PreconditionFailed, match="phase 'unmask', not 'masked_input'"):
        server.add_masked_input(late)
    with pytest.raises(PreconditionFailed, match="not a survivor"):
        server.add_unmask(UnmaskShares(N - 1, {}, {}))


def test_fixed_point_sum_is_within_documented_bound_and_unbiased() -> None:
    n, clip = 10, 0.5
    scale = max_scale(clip, n) / 1e6  # a coarse scale makes the rounding error visible
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=5000).astype(np.float32) for _ in range(n)]
    total = np.zeros(5000, dtype=np.uint32)
    for x in xs:
        total += encode(x, clip, scale, rng=rng)
    exact = sum(np.clip(x.astype(np.float64), -clip, clip) for x in xs)
    assert np.max(np.abs(decode_sum(total, scale) - exact)) < n / scale
    # Stochastic rounding is unbiased: the mean of many encodings of 0.3 units is 0.3 units.
    many = encode(np.full(200_000, 0.3 / scale, dtype=np.float64), clip, scale, rng=2)
    assert abs(decode_sum(many, scale).mean() * scale - 0.3) < 0.01


def test_max_scale_sum_of_extremes_does_not_wrap() -> None:
    n, clip = 100, 3.0
    scale = max_scale(clip, n)
    for sign in (1.0, -1.0):
        total = np.zeros(4, dtype=np.uint32)
        for i in range(n):
            total += encode(np.full(4, sign * 10.0, dtype=np.float32), clip, scale, rng=i)
        np.testing.assert_allclose(decode_sum(total, scale), sign * n * clip, atol=n / scale)
    with pytest.raises(InvalidInput, match="scale"):
        SecAggParams(n, 8, 5, clip, scale * 1.01, 4, ROUND_ID)


@pytest.mark.parametrize("secret", [bytes(range(32)), b"\xff" * 32, b"k" * 100, b""])
def test_shamir_any_threshold_subset_rebuilds_the_secret(secret: bytes) -> None:
    shares = shamir.split(secret, 7, 4)
    for subset in itertools.combinations(shares, 4):
        assert shamir.combine(list(subset), 4) == secret
    with pytest.raises(PreconditionFailed, match="need 4 shares to rebuild the secret, got 3"):
        shamir.combine(shares[:3], 4)


def test_shamir_custom_points_and_corrupt_shares() -> None:
    shares = shamir.split(b"s" * 32, 3, 2, xs=[5, 9, 11])
    assert [x for x, _ in shares] == [5, 9, 11]
    assert shamir.combine([shares[2], shares[0]], 2) == b"s" * 32
    with pytest.raises(InvalidInput, match="distinct"):
        shamir.combine([shares[0], shares[0]], 2)
    with pytest.raises(InvalidInput):
        shamir.combine([shares[0], (9, shares[1][1][:-1])], 2)


@pytest.mark.parametrize(("n", "degree"), [(10, 8), (10, 3), (11, 4), (100, 30), (7, 6), (2, 1)])
def test_graph_is_symmetric_regular_and_deterministic(n: int, degree: int) -> None:
    graph = neighbor_graph(n, degree, ROUND_ID)
    assert all(len(g) == degree and i not in g for i, g in enumerate(graph))
    assert all(i in graph[j] for i, g in enumerate(graph) for j in g)
    assert graph == neighbor_graph(n, degree, ROUND_ID)
    if 0 < degree < n - 2:
        assert graph != neighbor_graph(n, degree, b"another round id")


def test_params_name_the_bad_value() -> None:
    with pytest.raises(InvalidInput, match=r"threshold=4 must be above degree // 2 = 4"):
        make_params(threshold=4)
    with pytest.raises(InvalidInput, match="threshold=9 is above degree=8"):
        make_params(threshold=9)
    with pytest.raises(InvalidInput, match=r"degree must be in \[1, n-1=9\], got 10"):
        make_params(degree=10)
    with pytest.raises(InvalidInput, match="odd degree=3 needs an even number of participants"):
        make_params(n_clients=9, degree=3, threshold=2, scale=1.0)
    with pytest.raises(InvalidInput, match="round_id"):
        make_params(round_id=b"short")
    assert SecAggParams.from_bytes(make_params().to_bytes()) == make_params()


def test_messages_round_trip_and_reject_garbage() -> None:
    advert = ClientSession(make_params(), 3).advertise()
    assert KeyAdvert.from_bytes(advert.to_bytes()) == advert
    assert advert.signed_bytes().endswith(advert.to_bytes()) and ROUND_ID in advert.signed_bytes()
    answer = UnmaskShares(2, {1: b"ab", 4: b"c"}, {5: b"def"})
    assert UnmaskShares.from_bytes(answer.to_bytes()) == answer
    masked = MaskedInput(1, frozenset({2, 3}), np.arange(5, dtype=np.uint32))
    back = MaskedInput.from_bytes(masked.to_bytes())
    assert back.peers == masked.peers and np.array_equal(back.vector, masked.vector)
    with pytest.raises(InvalidInput, match="truncated"):
        KeyAdvert.from_bytes(advert.to_bytes()[:-1])
    with pytest.raises(InvalidInput, match="trailing"):
        UnmaskShares.from_bytes(answer.to_bytes() + b"\0")
    with pytest.raises(InvalidInput, match="kind"):
        EncryptedShare.from_bytes(answer.to_bytes())
