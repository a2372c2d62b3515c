"""Speed-balanced data parallelism: each rank's share of the global batch.

The update does not depend on the split: every rank divides its loss by the step's global target
count and the ranks' gradients are summed (worker/rank/trainer.py), so any split of the same
global batch is the same update to float rounding. A split is therefore free to follow the ranks'
speeds: a Mac twice as fast takes twice the examples (or packed rows), and no step waits for the
slowest machine.

Pure Python. ``Balancer`` measures this rank's items per busy second (its compute, not the time it
waited in the exchange), the trainer sums every rank's figure with the report's own collective,
and every rank derives the same new split from the same sums. A new split is taken only when it
shortens the predicted step by ``GAIN`` (measurements are noisy; a new split also costs a
recompile of new shapes under mx.compile). ``caps`` bound a rank's share (the planner's memory
limits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GAIN = 0.10  # a new split must shorten the predicted step by this much


def split(total: int, rates: list[float], caps: list[int] | None = None) -> tuple[int, ...]:
    """Integer shares of ``total`` items that minimize the slowest rank's time (share / rate):
    every rank at least one item, none above its cap. Greedy, one item at a time to the rank that
    would finish it first (ties: the lower rank), which is optimal for this objective."""
    n = len(rates)
    caps = caps or [total] * n
    if total < n or sum(min(c, total) for c in caps) < total:
        raise ValueError(f"{total} items cannot be split over {n} ranks with caps {caps}")
    shares = [1] * n
    for _ in range(total - n):
        best = min((r for r in range(n) if shares[r] < caps[r]),
                   key=lambda r: ((shares[r] + 1) / rates[r], r))
        shares[best] += 1
    return tuple(shares)


def equal(total: int, size: int) -> tuple[int, ...]:
    return split(total, [1.0] * size)


def owners(shares: tuple[int, ...]) -> list[int]:
    """Which rank takes each item of a global batch: a smooth weighted round robin, so every rank
    gets items from along the (length-sorted) batch. Equal shares give ``0, 1, .., n-1, 0, 1, ..``:
    mlx-lm's strided split (``batch[rank::size]``)."""
    total = sum(shares)
    current = [0] * len(shares)
    out = []
    for _ in range(total):
        current = [c + s for c, s in zip(current, shares)]
        pick = max(range(len(shares)), key=lambda r: (current[r], -r))
        current[pick] -= total
        out.append(pick)
    return out


def take(items: list, shares: tuple[int, ...], rank: int) -> list:
    """This rank's items of one global batch under ``shares``."""
    if len(items) != sum(shares):
        raise ValueError(f"a global batch of {len(items)} items, shares {shares}")
    return [it for it, owner in zip(items, owners(shares)) if owner == rank]


def step_time(shares: tuple[int, ...], rates: list[float]) -> float:
    return max(s / r for s, r in zip(shares, rates))


@dataclass
class Balancer:
    """One rank's view: the split in force, and its own speed since the last decision."""

    rank: int
    shares: tuple[int, ...]
    enabled: bool = True
    caps: list[int] | None = None
    _items: float = 0.0
    _seconds: float = 0.0
    _warm: bool = False  # the first step after a start or a new split (compiles) is not timed
    history: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.shares)

    @property
    def active(self) -> bool:
        return self.enabled and self.size > 1

    def observe(self, seconds: float) -> None:
        """One micro-batch done: this rank's share of it took ``seconds`` of compute."""
        if not self._warm:
            self._warm = True
            return
        self._items += self.shares[self.rank]
        self._seconds += seconds

    def local_rates(self) -> list[float]:
        """This rank's items per second in its own slot, zeros elsewhere: summed over the ranks
        (one collective, with the report's), every rank holds every rank's rate."""
        if not self.active:
            return []
        rates = [0.0] * self.size
        if self._seconds > 0:
            rates[self.rank] = self._items / self._seconds
        return rates

    def decide(self, rates: list[float], iteration: int) -> tuple[int, ...] | None:
        """The new split, or None to keep this one; the same on every rank (same ``rates``)."""
        if not self.active or len(rates) != self.size or min(rates) <= 0:
            return None
        self._items, self._seconds = 0.0, 0.0
        new = split(sum(self.shares), rates, self.caps)
        if new == self.shares or step_time(new, rates) > (1 - GAIN) * step_time(self.shares,
                                                                                 rates):
            return None
        self.shares, self._warm = new, False
        self.history.append((iteration, new))
        return new
