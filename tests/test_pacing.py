"""Idle pacing: thousands of polling clients together stay under the heartbeat budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.coordinator.presence import IDLE_POLLS_PER_SECOND, MISSED_HEARTBEATS, Presence


def _connected(n: int, presence: Presence) -> None:
    for i in range(n):
        presence.touch(f"c{i}")
    presence._paced_at = 0.0  # recompute now, not after the 1 s the coordinator waits between


@pytest.mark.parametrize("shared", [False, True])
def test_the_interval_grows_with_polling_clients_and_held_calls_do_not_count(tmp_path: Path, shared: bool) -> None:
    presence = Presence(1, shared=tmp_path / "presence.db" if shared else None)
    _connected(100, presence)
    assert presence.idle_interval() == 1.0  # 100 a second is under the budget: the heartbeat interval
    _connected(2000, presence)
    assert presence.idle_interval() == pytest.approx(2000 / IDLE_POLLS_PER_SECOND)  # 8 s: 250 a second
    presence._paced_at = 0.0
    assert presence.idle_interval(held=1900) == 1.0  # 100 poll, the other 1,900 hold a long-poll
    presence._paced_at = 0.0
    presence.idle_interval()
    # A paced client still counts as connected between its polls: the window widens with the interval.
    assert presence.window() == pytest.approx(2000 / IDLE_POLLS_PER_SECOND * MISSED_HEARTBEATS)
    if shared:  # engines in other processes (Ray) read the same window from the presence DB
        assert Presence(1, shared=tmp_path / "presence.db").window() == pytest.approx(presence.window())


def test_paced_clients_are_told_80_to_120_percent_of_the_interval_with_the_same_mean() -> None:
    presence = Presence(1)
    _connected(2000, presence)
    told = [presence.idle_retry() for _ in range(4000)]
    assert min(told) >= 0.8 * 8 and max(told) <= 1.2 * 8
    assert max(told) - min(told) > 0.3 * 8  # spread, not all the same
    assert sum(told) / len(told) == pytest.approx(8, rel=0.02)
    unpaced = Presence(1)
    _connected(10, unpaced)
    assert {unpaced.idle_retry() for _ in range(20)} == {1.0}
