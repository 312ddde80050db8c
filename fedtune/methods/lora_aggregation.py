"""Pure tensor functions for LoRA-aware federated aggregation.

Adapter states are ``name -> Tensor`` dicts keyed as peft's ``get_peft_model_state_dict`` saves them:
a LoRA module at path ``P`` holds ``P.lora_A.weight`` (r, in) and ``P.lora_B.weight`` (out, r), or, for
an Embedding target, ``P.lora_embedding_A`` (r, num_embeddings) and ``P.lora_embedding_B`` (dim, r).
Every other tensor (DoRA's ``P.lora_magnitude_vector``, ``modules_to_save`` weights, biases) is
"plain" and is aggregated by the ordinary weighted mean.

Averaging A and B separately (FedAvg of the factors) does not average the updates the clients
learned: mean(B)·mean(A) != mean(B·A). :func:`exact_aggregate` instead averages the products
ΔW = B·A and factors the mean back to a rank-``r`` pair by a truncated SVD, which is the best
rank-``r`` approximation of the exact mean (Eckart-Young) and also accepts clients of different ranks.

Everything here accumulates in float64, so that the result does not depend on the clients' order
beyond float64 rounding, and nothing here imports peft.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from fedtune.errors import InvalidInput

# (A suffix, B suffix) of each key style peft saves; the first is nn.Linear / Conv, the second Embedding.
_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
_STYLES = (_LINEAR, _EMBEDDING)

State = dict[str, torch.Tensor]


def _classify(key: str) -> tuple[str, str, tuple[str, str]] | None:
    """``(module path, "A" or "B", style)`` of a LoRA factor key, or None for a plain key."""
    for style in _STYLES:
        for side, suffix in zip(("A", "B"), style):
            if key.endswith(suffix) and len(key) > len(suffix):
                return key[: -len(suffix)], side, style
    return None


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Pairs every LoRA A key with its B key.

    Args:
        keys: State-dict keys as saved by peft's ``get_peft_model_state_dict``.

    Returns:
        Module path -> (A key, B key), in the order the modules first appear in ``keys``.

    Raises:
        InvalidInput: When a module has an A without a B (or a B without an A), or mixes the
            Linear and Embedding key styles.
    """
    found: dict[str, dict[str, str]] = {}
    styles: dict[str, tuple[str, str]] = {}
    for key in keys:
        hit = _classify(key)
        if hit is None:
            continue
        module, side, style = hit
        if styles.setdefault(module, style) != style:
            raise InvalidInput(f"LoRA module {module!r} mixes {styles[module]} and {style} keys")
        found.setdefault(module, {})[side] = key
    pairs: dict[str, tuple[str, str]] = {}
    for module, sides in found.items():
        for side, other in (("A", "B"), ("B", "A")):
            if side in sides and other not in sides:
                raise InvalidInput(f"LoRA module {module!r} has lora_{side} ({sides[side]!r}) but no lora_{other}")
        pairs[module] = (sides["A"], sides["B"])
    return pairs


def _factor_keys(pairs: Mapping[str, tuple[str, str]]) -> set[str]:
    return {key for pair in pairs.values() for key in pair}


def _pair_rank(module: str, a: torch.Tensor, b: torch.Tensor) -> int:
    """The rank of one (A, B) pair after checking that the shapes fit B @ A."""
    if a.dim() != 2 or b.dim() != 2:
        raise InvalidInput(f"LoRA module {module!r}: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise InvalidInput(f"LoRA module {module!r}: A has {a.shape[0]} rows but B has {b.shape[1]} columns")
    return int(a.shape[0])


def rank_of_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The rank of every LoRA pair of a state (e.g. to build peft's ``rank_pattern``).

    Args:
        state: An adapter state.

    Returns:
        Module path -> rank (rows of A, equal to the columns of B).

    Raises:
        InvalidInput: On unpaired keys or when A's rows and B's columns disagree.
    """
    return {module: _pair_rank(module, state[a], state[b]) for module, (a, b) in lora_pairs(state).items()}


def state_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The single rank shared by every LoRA pair of a state.

    Args:
        state: An adapter state.

    Returns:
        The rank of its pairs.

    Raises:
        InvalidInput: When the state has no LoRA pair, or a module's rank differs from the first
            module's (the message names both).
    """
    ranks = rank_of_pairs(state)
    if not ranks:
        raise InvalidInput("the state has no LoRA (lora_A, lora_B) pair")
    first, rank = next(iter(ranks.items()))
    for module, other in ranks.items():
        if other != rank:
            raise InvalidInput(f"LoRA module {module!r} has rank {other} but {first!r} has rank {rank}")
    return rank


def _normalised_weights(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> list[float]:
    """Checks the weights and returns them divided by their sum (so the mean is Σ w_i x_i)."""
    if not states:
        raise InvalidInput("no client states to aggregate")
    if len(weights) != len(states):
        raise InvalidInput(f"{len(states)} states but {len(weights)} weights")
    ws = [float(w) for w in weights]
    for i, w in enumerate(ws):
        if not math.isfinite(w) or w < 0:
            raise InvalidInput(f"weight {i} must be finite and non-negative, got {w}")
    total = math.fsum(ws)
    if total <= 0:
        raise InvalidInput("the weights sum to 0")
    return [w / total for w in ws]


def _check_same_keys(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """All clients must send the same tensors: a missing one would silently bias the mean."""
    reference = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        keys = set(state)
        if keys != reference:
            missing = sorted(reference - keys)
            extra = sorted(keys - reference)
            name = (missing or extra)[0]
            what = "lacks" if missing else "has the extra key"
            raise InvalidInput(f"client state {i} {what} {name!r} (client 0 differs)")


def _weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], norm: Sequence[float], key: str) -> torch.Tensor:
    """Σ w_i x_i in float64, returned in client 0's dtype."""
    first = states[0][key]
    if not first.is_floating_point():
        raise InvalidInput(f"tensor {key!r} is {first.dtype}; only floating-point tensors can be averaged")
    total = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for i, (state, w) in enumerate(zip(states, norm)):
        x = state[key]
        if x.shape != first.shape:
            raise InvalidInput(f"tensor {key!r} of client {i} has shape {tuple(x.shape)}, client 0 {tuple(first.shape)}")
        total += w * x.to(device=first.device, dtype=torch.float64)
    return total.to(first.dtype)


def product_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                 scales: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The weighted mean of the LoRA products, per module.

    Computes Σ w_i s_i B_i A_i / Σ w_i in float64. Clients may train at different ranks (A_i of
    shape (r_i, in), B_i of shape (out, r_i)); only ``out`` and ``in`` must agree.

    Args:
        states: The clients' adapter states (all with the same LoRA modules).
        weights: One non-negative weight per client (e.g. example counts); they need not sum to 1.
        scales: One factor per client, 1 by default. With heterogeneous ranks pass the client's
            LoRA scaling divided by the job's (alpha/r_i over alpha/r) so that every product is
            expressed at the job's scaling.

    Returns:
        Module path -> ΔW (out, in) as a float64 tensor.

    Raises:
        InvalidInput: On bad weights or scales, unpaired keys, clients with different modules or
            different (out, in) shapes.
    """
    norm = _normalised_weights(states, weights)
    if scales is None:
        factors = norm
    else:
        if len(scales) != len(states):
            raise InvalidInput(f"{len(states)} states but {len(scales)} scales")
        for i, s in enumerate(scales):
            if not math.isfinite(float(s)):
                raise InvalidInput(f"scale {i} must be finite, got {s}")
        factors = [w * float(s) for w, s in zip(norm, scales)]
    client_pairs = [lora_pairs(state) for state in states]
    pairs = client_pairs[0]
    for i, other in enumerate(client_pairs[1:], start=1):
        if set(other) != set(pairs):
            module = min(set(pairs) ^ set(other))
            where = (0, i) if module in pairs else (i, 0)
            raise InvalidInput(f"LoRA module {module!r} is in client {where[0]} but not in client {where[1]}")
    products: dict[str, torch.Tensor] = {}
    for module, (a_key, b_key) in pairs.items():
        a0, b0 = states[0][a_key], states[0][b_key]
        shape = (b0.shape[0], a0.shape[1])
        total = torch.zeros(shape, dtype=torch.float64, device=a0.device)
        for i, (state, keys, f) in enumerate(zip(states, client_pairs, factors)):
            a, b = state[keys[module][0]], state[keys[module][1]]
            _pair_rank(module, a, b)
            if (b.shape[0], a.shape[1]) != shape:
                raise InvalidInput(f"LoRA module {module!r} of client {i} has ΔW shape "
                                   f"{(b.shape[0], a.shape[1])}, client 0 {shape}")
            if f == 0.0:
                continue
            a64 = a.to(device=a0.device, dtype=torch.float64)
            b64 = b.to(device=a0.device, dtype=torch.float64)
            total += f * (b64 @ a64)
        products[module] = total
    return products


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Balanced rank-``rank`` factors (B, A) of ``delta`` in float64 and the relative truncation error."""
    out_f, in_f = delta.shape
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    # SVD signs are arbitrary (and differ between LAPACK builds); fixing them makes the factors, and
    # so the next round's starting point, reproducible: the largest |entry| of each U column is positive.
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1.0
    u = u * signs
    vh = vh * signs[:, None]
    kept = min(rank, s.shape[0])
    root = s[:kept].sqrt()
    b = torch.zeros((out_f, rank), dtype=torch.float64, device=delta.device)
    a = torch.zeros((rank, in_f), dtype=torch.float64, device=delta.device)
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    # ‖ΔW − B A‖_F equals the norm of the discarded singular values; taking it from them avoids the
    # cancellation of subtracting two nearly equal matrices.
    total = float(torch.linalg.vector_norm(s))
    error = 0.0 if total == 0.0 else float(torch.linalg.vector_norm(s[kept:])) / total
    return b, a, error


def refactor(products: Mapping[str, torch.Tensor], rank: int,
             pairs: Mapping[str, tuple[str, str]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Factors each ΔW back into a LoRA pair of rank ``rank`` by truncated SVD.

    With ΔW = U S V^T, B = U_r sqrt(S_r) and A = sqrt(S_r) V_r^T (the balanced split, so that neither
    factor carries all the scale). Components are ordered by singular value descending, so
    :func:`truncate_rank` of the result to a lower rank is again the best approximation at that
    rank. When ``rank`` exceeds min(out, in) the extra components are zero.

    Args:
        products: Module path -> ΔW (out, in), e.g. from :func:`product_mean`.
        rank: The rank of the pairs to produce (> 0).
        pairs: Module path -> (A key, B key) naming the output keys, e.g. ``lora_pairs`` of a
            client state, which keeps Embedding targets under ``lora_embedding_A/B``. Modules it
            does not name (or all, when None) get ``P.lora_A.weight`` / ``P.lora_B.weight``.

    Returns:
        (the factors as float32 tensors, module path -> relative truncation error
        ‖ΔW − B A‖_F / ‖ΔW‖_F, 0 where ΔW is 0).

    Raises:
        InvalidInput: When ``rank`` < 1, a ΔW is not 2-D or not finite.
    """
    if rank < 1:
        raise InvalidInput(f"rank must be at least 1, got {rank}")
    pairs = pairs or {}
    factors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for module, delta in products.items():
        if delta.dim() != 2:
            raise InvalidInput(f"ΔW of LoRA module {module!r} must be 2-D, got shape {tuple(delta.shape)}")
        delta64 = delta.to(torch.float64)
        if not bool(torch.isfinite(delta64).all()):
            raise InvalidInput(f"ΔW of LoRA module {module!r} is not finite")
        b, a, errors[module] = _svd_factors(delta64, rank)
        a_key, b_key = pairs.get(module, (module + _LINEAR[0], module + _LINEAR[1]))
        factors[a_key] = a.to(torch.float32)
        factors[b_key] = b.to(torch.float32)
    return factors, errors


def truncation_error(errors: Mapping[str, float], products: Mapping[str, torch.Tensor]) -> float:
    """The overall relative truncation error across modules.

    sqrt(Σ_m (e_m ‖ΔW_m‖_F)^2) / sqrt(Σ_m ‖ΔW_m‖_F^2): the relative Frobenius error of all modules
    taken as one block-diagonal update, so that large updates count more than tiny ones.

    Args:
        errors: Module path -> relative error, as :func:`refactor` returns.
        products: Module path -> ΔW the errors were computed on (gives each module's weight).

    Returns:
        The overall relative error (0 when every ΔW is 0 or there is no module).

    Raises:
        InvalidInput: When a module of ``errors`` has no product.
    """
    lost = 0.0
    total = 0.0
    for module, error in errors.items():
        if module not in products:
            raise InvalidInput(f"LoRA module {module!r} has an error but no product")
        norm = float(torch.linalg.vector_norm(products[module].to(torch.float64)))
        lost += (error * norm) ** 2
        total += norm**2
    return 0.0 if total == 0.0 else math.sqrt(lost / total)


def exact_aggregate(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], rank: int,
                    scales: Sequence[float] | None = None,
                    plain_keys_mean: bool = True) -> tuple[dict[str, torch.Tensor], float]:
    """The new global adapter: the exact mean of the LoRA products refactored at ``rank``.

    Args:
        states: The clients' adapter states; same modules and plain keys, ranks may differ.
        weights: One non-negative weight per client.
        rank: The rank of the global pairs.
        scales: Per-client scaling of the products (see :func:`product_mean`); it does not apply to
            plain tensors, which do not depend on the LoRA scaling.
        plain_keys_mean: When True the plain tensors are the weighted mean of the clients'; when
            False they are left out of the result (for a caller that aggregates them itself).

    Returns:
        (the state, in client 0's key order: float32 LoRA pairs and plain tensors in client 0's
        dtype; the overall relative truncation error, see :func:`truncation_error`).

    Raises:
        InvalidInput: On bad weights, scales or rank, or clients whose keys or shapes differ.
    """
    norm = _normalised_weights(states, weights)
    _check_same_keys(states)
    pairs = lora_pairs(states[0])
    products = product_mean(states, weights, scales)
    factors, errors = refactor(products, rank, pairs)
    lora_keys = _factor_keys(pairs)
    out: dict[str, torch.Tensor] = {}
    for key in states[0]:
        if key in lora_keys:
            out[key] = factors[key]
        elif plain_keys_mean:
            out[key] = _weighted_mean(states, norm, key)
    return out, truncation_error(errors, products)


def pad_rank(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Zero-pads every LoRA pair to ``rank`` (A gains zero rows, B zero columns), as HetLoRA does.

    B·A is unchanged. Plain tensors are passed through as they are (not copied).

    Args:
        state: An adapter state.
        rank: The target rank, at least every pair's rank.

    Returns:
        The padded state, in the input's key order and dtypes.

    Raises:
        InvalidInput: When a pair's rank exceeds ``rank`` (padding cannot shrink) or pairs are bad.
    """
    from fedtune.methods.lora import is_lora_a, is_lora_b

    # Tensor by tensor, not pair by pair: an ffa update carries B without its (frozen) A.
    out = dict(state)
    for key, value in state.items():
        dim = 0 if is_lora_a(key) else 1 if is_lora_b(key) else None
        if dim is None:
            continue
        r = value.shape[dim]
        if rank < r:
            raise InvalidInput(f"cannot pad LoRA tensor {key!r} of rank {r} to the smaller rank {rank}")
        pad = list(value.shape)
        pad[dim] = rank - r
        out[key] = torch.cat([value, value.new_zeros(pad)], dim=dim)
    return out


def truncate_rank(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Keeps the first ``rank`` components of every LoRA pair (A rows [:rank], B columns [:, :rank]).

    On a state from :func:`refactor` (components by singular value descending) this is the best
    approximation at ``rank``. Plain tensors are passed through as they are (not copied).

    Args:
        state: An adapter state.
        rank: The target rank, at least 1 and at most every pair's rank.

    Returns:
        The truncated state with contiguous copies of the kept factors.

    Raises:
        InvalidInput: When ``rank`` < 1 or exceeds a pair's rank, or pairs are bad.
    """
    if rank < 1:
        raise InvalidInput(f"rank must be at least 1, got {rank}")
    out = dict(state)
    for module, (a_key, b_key) in lora_pairs(state).items():
        a, b = state[a_key], state[b_key]
        r = _pair_rank(module, a, b)
        if rank > r:
            raise InvalidInput(f"cannot truncate LoRA module {module!r} of rank {r} to the larger rank {rank}")
        # Copies: a view would keep the whole tensor alive and is not contiguous for B.
        out[a_key] = a[:rank].clone()
        out[b_key] = b[:, :rank].contiguous().clone()
    return out


def factor_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                rank: int) -> dict[str, torch.Tensor]:
    """FedAvg of A and B separately after zero-padding every client to ``rank``.

    This is the ``factors`` aggregation (HetLoRA-style with heterogeneous ranks). It is not the mean
    of the updates, mean(B)·mean(A) != mean(B·A); use :func:`exact_aggregate` for that.

    Args:
        states: The clients' adapter states; same keys, pair ranks at most ``rank``.
        weights: One non-negative weight per client.
        rank: The rank every client is padded to.

    Returns:
        The weighted mean of every tensor (accumulated in float64, in client 0's dtypes and key order).

    Raises:
        InvalidInput: On bad weights, a client rank above ``rank``, or clients whose keys differ.
    """
    norm = _normalised_weights(states, weights)
    _check_same_keys(states)
    padded = [pad_rank(state, rank) for state in states]
    return {key: _weighted_mean(padded, norm, key) for key in padded[0]}


def split_ab(state: Mapping[str, torch.Tensor]) -> tuple[State, State, State]:
    """Splits a state into its A factors, its B factors and its plain tensors.

    Args:
        state: An adapter state.

    Returns:
        (A keys -> tensors, B keys -> tensors, plain keys -> tensors), each in the input's key order.

    Raises:
        InvalidInput: On unpaired LoRA keys.
    """
    pairs = lora_pairs(state)
    a_keys = {a for a, _ in pairs.values()}
    b_keys = {b for _, b in pairs.values()}
    a_part: State = {}
    b_part: State = {}
    plain: State = {}
    for key, tensor in state.items():
        target = a_part if key in a_keys else b_part if key in b_keys else plain
        target[key] = tensor
    return a_part, b_part, plain
