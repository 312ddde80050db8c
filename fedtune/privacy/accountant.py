"""Renyi-DP accounting for the sampled Gaussian mechanism, and its conversion to (epsilon, delta).

The analysis is Mironov, Talwar and Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism" (arXiv:1908.10530, Section 3.3), the same one TF Privacy's ``compute_rdp`` and Opacus's
``RDPAccountant`` implement; the numerics follow them closely so that epsilons agree with both to
floating-point precision. It assumes Poisson sampling (each client joins a round independently with
probability ``q``) under add/remove-one-client adjacency, and a mechanism with L2 sensitivity 1 and
noise std ``noise_multiplier`` (DP-FedAvg's sum of clipped updates, in units of the clip norm).

Pure Python on purpose: a few hundred scalar terms per order do not need numpy or scipy.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from fedtune.errors import InvalidInput

logger = logging.getLogger(__name__)

# Opacus's default alphas: dense just above 1 where small-epsilon optima sit, integers up to 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

_FORMAT = "fedtune.rdp-accountant/1"
# The fractional-order series stops once both new terms are below e^-30 (as TF Privacy and Opacus).
_SERIES_CUTOFF = -30.0
# Below this, math.erfc(x) > 1e-280 keeps full relative precision; above it, use the tail series.
_ERFC_DIRECT_LIMIT = 25.0


def compute_rdp(q: float, noise_multiplier: float, steps: int, orders: Sequence[float]) -> list[float]:
    """RDP of the sampled Gaussian mechanism composed ``steps`` times, at each order.

    Args:
        q: Sampling rate in [0, 1]: the probability that one given client is in a round's cohort.
            1 means no subsampling (closed form ``alpha / (2 z^2)``); 0 means nobody is ever sampled.
        noise_multiplier: Noise std divided by the L2 sensitivity (z = sigma / C), >= 0. 0 gives
            infinite RDP (no privacy).
        steps: How many times the mechanism runs, >= 0.
        orders: Renyi orders, each > 1 (integer or fractional).

    Returns:
        The RDP epsilon at each order, in order; entries can be ``math.inf``.

    Raises:
        InvalidInput: If any argument is out of range.
    """
    _check_sample_rate(q)
    _check_noise_multiplier(noise_multiplier)
    _check_steps(steps)
    orders_t = _check_orders(orders)
    if steps == 0:
        return [0.0] * len(orders_t)
    # Cached per (q, z, orders): the accountant asks again every round with the same parameters.
    return [r * steps for r in _rdp_per_step(float(q), float(noise_multiplier), orders_t)]


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """Converts RDP at several orders to the tightest (epsilon, delta)-DP guarantee among them.

    Uses the improved conversion of Balle et al. 2020, "Hypothesis Testing Interpretations and
    Renyi Differential Privacy", Theorem 21 (equivalently Canonne, Kamath and Steinke 2020,
    Proposition 12): ``eps = rdp + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1)``, exactly as
    Opacus's ``get_privacy_spent``. It is tighter than Mironov's ``rdp + log(1 / delta) / (a - 1)``.
    A negative result is reported as 0, which is still a valid (weaker) claim.

    Args:
        orders: Renyi orders, each > 1.
        rdp: RDP epsilon at each order (same length as ``orders``); ``math.inf`` is allowed.
        delta: Target delta in (0, 1).

    Returns:
        ``(epsilon, order)``: the smallest epsilon and the order that gives it; ``(inf, nan)``
        when every order has infinite RDP.

    Raises:
        InvalidInput: If ``delta`` or an order is out of range, or the lengths differ.
    """
    orders_t = _check_orders(orders)
    _check_delta(delta)
    if len(rdp) != len(orders_t):
        raise InvalidInput(f"rdp has {len(rdp)} values but there are {len(orders_t)} orders")
    best_eps, best_order = math.inf, math.nan
    log_delta = math.log(delta)
    for a, r in zip(orders_t, rdp):
        if math.isnan(r) or r < 0:
            raise InvalidInput(f"rdp values must be >= 0, got {r} at order {a}")
        eps = r + math.log1p(-1.0 / a) - (log_delta + math.log(a)) / (a - 1)
        if eps < best_eps:
            best_eps, best_order = eps, a
    if math.isinf(best_eps):
        return math.inf, math.nan
    if best_order in (orders_t[0], orders_t[-1]):
        # Not wrong, only possibly loose: a wider range of orders could give a smaller epsilon.
        logger.debug("optimal RDP order %s is at the edge of the orders searched", best_order)
    return max(0.0, best_eps), best_order


class RdpAccountant:
    """Privacy spent so far by a run of sampled Gaussian mechanisms (one per federated round).

    Keeps the history as ``(noise_multiplier, sample_rate, steps)`` entries, merging consecutive
    steps with the same parameters, so its JSON form stays small and is exact to recompute from.

    Example:
        >>> acct = RdpAccountant()
        >>> for _ in range(100):
        ...     acct.step(noise_multiplier=1.0, sample_rate=0.1)
        >>> eps = acct.epsilon(delta=1e-5)
    """

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        """Starts with no privacy spent.

        Args:
            orders: Renyi orders to search when converting to epsilon; Opacus's by default.
        """
        self._orders = _check_orders(DEFAULT_ORDERS if orders is None else orders)
        self._history: list[tuple[float, float, int]] = []

    @property
    def orders(self) -> tuple[float, ...]:
        """The Renyi orders searched."""
        return self._orders

    @property
    def history(self) -> tuple[tuple[float, float, int], ...]:
        """``(noise_multiplier, sample_rate, steps)`` entries, oldest first."""
        return tuple(self._history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Records ``steps`` runs of the mechanism with these parameters.

        Args:
            noise_multiplier: Noise std over clip norm, >= 0.
            sample_rate: Probability that one given client takes part, in [0, 1].
            steps: How many runs (rounds), >= 0.

        Raises:
            InvalidInput: If any argument is out of range (nothing is recorded then).
        """
        _check_noise_multiplier(noise_multiplier)
        _check_sample_rate(sample_rate)
        _check_steps(steps)
        if steps == 0:
            return
        z, q, steps = float(noise_multiplier), float(sample_rate), int(steps)
        if self._history and self._history[-1][:2] == (z, q):
            self._history[-1] = (z, q, self._history[-1][2] + steps)
        else:
            self._history.append((z, q, steps))

    def rdp(self) -> list[float]:
        """The composed RDP epsilon at each of `orders` (composition adds RDP order by order)."""
        total = [0.0] * len(self._orders)
        for z, q, steps in self._history:
            for i, r in enumerate(compute_rdp(q, z, steps, self._orders)):
                total[i] += r
        return total

    def privacy_spent(self, delta: float) -> tuple[float, float]:
        """The (epsilon, best order) spent so far at this delta; ``(0, nan)`` before any step.

        Raises:
            InvalidInput: If ``delta`` is not in (0, 1).
        """
        _check_delta(delta)
        if not self._history:
            return 0.0, math.nan
        return rdp_to_epsilon(self._orders, self.rdp(), delta)

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at this delta (0 before any step; inf if any step had z = 0).

        Raises:
            InvalidInput: If ``delta`` is not in (0, 1).
        """
        return self.privacy_spent(delta)[0]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form of the accountant, for `from_dict` to restore exactly."""
        return {
            "format": _FORMAT,
            "orders": list(self._orders),
            "history": [
                {"noise_multiplier": z, "sample_rate": q, "steps": steps} for z, q, steps in self._history
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RdpAccountant:
        """Restores an accountant saved by `to_dict`.

        Raises:
            InvalidInput: If ``data`` is not a saved accountant or holds out-of-range values.
        """
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise InvalidInput(f"not a saved RDP accountant (format {got!r}, expected {_FORMAT!r})")
        history = data.get("history")
        if not isinstance(history, list):
            raise InvalidInput(f"saved RDP accountant history must be a list, got {history!r}")
        acct = cls(orders=data.get("orders"))
        for entry in history:
            try:
                z, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
            except (TypeError, KeyError) as e:
                raise InvalidInput(f"bad saved RDP accountant entry: {entry!r}") from e
            acct.step(z, q, steps)
        return acct


@functools.lru_cache(maxsize=64)
def _rdp_per_step(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(_rdp_one_order(q, sigma, a) for a in orders)


def _rdp_one_order(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        log_a = _log_a_int(q, sigma, int(alpha))
    else:
        log_a = _log_a_frac(q, sigma, alpha)
    return log_a / (alpha - 1)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha: a finite binomial sum (Mironov et al. 2019, Section 3.3)."""
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = math.log(math.comb(alpha, i)) + i * math.log(q) + (alpha - i) * math.log1p(-q)
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha: the integral split at z0, each half an infinite series.

    Mirrors TF Privacy's ``_compute_log_a_frac``; the generalized binomial coefficients change sign
    once i passes alpha, so each half keeps a signed sum in log space.
    """
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    # binom(alpha, i) built up term by term: |coef| in log space and its sign.
    log_coef, coef_positive = 0.0, True
    i = 0
    while True:
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log_1mq
        log_t1 = log_coef + j * log_q + i * log_1mq
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef_positive:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < _SERIES_CUTOFF:
            break
        # binom(alpha, i + 1) = binom(alpha, i) * (alpha - i) / (i + 1); alpha is not an integer,
        # so the factor is never 0.
        factor = (alpha - i) / (i + 1)
        log_coef += math.log(abs(factor))
        coef_positive = coef_positive == (factor > 0)
        i += 1
    return _log_add(log_a0, log_a1)


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate where erfc(x) underflows (TF Privacy's fallback series)."""
    if x < _ERFC_DIRECT_LIMIT:
        return math.log(math.erfc(x))
    # Asymptotic expansion of log(sqrt(pi) * x * erfc(x)) at infinity; at x >= 25 the first
    # omitted term is below 1e-14.
    return (
        -math.log(math.pi) / 2
        - math.log(x)
        - x**2
        - 0.5 * x**-2
        + 0.625 * x**-4
        - 37.0 / 24.0 * x**-6
        + 353.0 / 64.0 * x**-8
    )


def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    if logx < logy:
        # The series' partial sums are positive in exact arithmetic; this means lost precision.
        raise ArithmeticError(f"log-space subtraction went negative ({logx} - {logy})")
    if logy == -math.inf:
        return logx
    if logx == logy:
        return -math.inf
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _is_number(x: object) -> bool:
    # numbers.Real also admits numpy scalars; bool is an int but never a meaningful rate or count.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_sample_rate(q: float) -> None:
    if not (_is_number(q) and 0.0 <= q <= 1.0):
        raise InvalidInput(f"sample_rate q must be in [0, 1], got {q!r}")


def _check_noise_multiplier(z: float) -> None:
    if not (_is_number(z) and math.isfinite(z) and z >= 0):
        raise InvalidInput(f"noise_multiplier must be a finite number >= 0, got {z!r}")


def _check_steps(steps: int) -> None:
    if not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 0):
        raise InvalidInput(f"steps must be an integer >= 0, got {steps!r}")


def _check_delta(delta: float) -> None:
    if not (_is_number(delta) and 0.0 < delta < 1.0):
        raise InvalidInput(f"delta must be in (0, 1), got {delta!r}")


def _check_orders(orders: Sequence[float] | None) -> tuple[float, ...]:
    bad = InvalidInput(f"orders must be a non-empty list of numbers > 1, got {orders!r}")
    if orders is None or isinstance(orders, (str, bytes, Mapping)):
        raise bad
    try:
        values = list(orders)  # numpy arrays are welcome too
    except TypeError as e:
        raise bad from e
    if not values:
        raise bad
    for a in values:
        if not (_is_number(a) and math.isfinite(a) and a > 1):
            raise InvalidInput(f"every RDP order must be a finite number > 1, got {a!r}")
    return tuple(float(a) for a in values)
