"""The pure rise/fall state machine, table-driven (HAProxy's single health integer)."""

from __future__ import annotations

import itertools

import pytest

from lb.health import risefall
from lb.health.risefall import DOWN, UNKNOWN, UP, HealthState


@pytest.mark.parametrize("checked, rise, fall, expected", [
    (True, 2, 3, HealthState(UNKNOWN, 0)),
    (False, 2, 3, HealthState(UP, 4)),
    (False, 1, 1, HealthState(UP, 1)),
    (False, 5, 10, HealthState(UP, 14)),
])
def test_initial_state(checked: bool, rise: int, fall: int, expected: HealthState) -> None:
    """A checked peer starts unknown with no failures counted; an unchecked one starts up at
    the top of the health integer (rise + fall - 1), so it takes `fall` failures to drop."""
    assert risefall.initial(checked, rise, fall) == expected


# (rise, fall, start, results as "+"/"-", expected (status, value) after each result)
TABLE = [
    # unknown: the first pass decides up; `fall` failures decide down
    (2, 3, (UNKNOWN, 0), "+", [(UP, 4)]),
    (2, 3, (UNKNOWN, 0), "---", [(UNKNOWN, 1), (UNKNOWN, 2), (DOWN, 0)]),
    (2, 3, (UNKNOWN, 0), "--+", [(UNKNOWN, 1), (UNKNOWN, 2), (UP, 4)]),
    (1, 1, (UNKNOWN, 0), "-", [(DOWN, 0)]),
    # up: each failure takes one off; below rise it is down (after exactly `fall`)
    (2, 3, (UP, 4), "---", [(UP, 3), (UP, 2), (DOWN, 0)]),
    # a pass in between puts it back at the top: failures must be consecutive
    (2, 3, (UP, 4), "--+--", [(UP, 3), (UP, 2), (UP, 4), (UP, 3), (UP, 2)]),
    # down: climbs one per pass, up at `rise` (jumping to the top)
    (2, 3, (DOWN, 0), "++", [(DOWN, 1), (UP, 4)]),
    (3, 2, (DOWN, 0), "++-++", [(DOWN, 1), (DOWN, 2), (DOWN, 0), (DOWN, 1), (DOWN, 2)]),
    (3, 2, (DOWN, 0), "+++", [(DOWN, 1), (DOWN, 2), (UP, 4)]),
    # failures while down stay at 0
    (2, 3, (DOWN, 0), "--", [(DOWN, 0), (DOWN, 0)]),
    # rise 1 / fall 1: every result decides
    (1, 1, (UP, 1), "-+-+", [(DOWN, 0), (UP, 1), (DOWN, 0), (UP, 1)]),
    # thresholds lowered by a reload: a value above the new top is clamped first
    (2, 3, (UP, 10), "-", [(UP, 3)]),
    # a down peer already past the new rise comes up on the next pass
    (2, 3, (DOWN, 3), "+", [(UP, 4)]),
    # passes at the top stay at the top
    (2, 3, (UP, 4), "++", [(UP, 4), (UP, 4)]),
]


@pytest.mark.parametrize("rise, fall, start, results, expected", TABLE)
def test_transition_table(rise: int, fall: int, start: tuple, results: str,
                          expected: list) -> None:
    """Each row: the states after each check result, starting from `start`."""
    state = HealthState(*start)
    seen = []
    for result in results:
        state = risefall.step(state, result == "+", rise, fall)
        seen.append(tuple(state))
    assert seen == expected


@pytest.mark.parametrize("rise, fall", list(itertools.product(range(1, 6), range(1, 6))))
def test_exactly_fall_failures_and_rise_passes(rise: int, fall: int) -> None:
    """For every rise/fall from 1 to 5: an up peer goes down on exactly the `fall`-th
    consecutive failure, a down peer comes up on exactly the `rise`-th consecutive pass,
    and the value always stays within 0..rise+fall-1."""
    top = rise + fall - 1
    state = risefall.initial(False, rise, fall)
    for i in range(1, fall + 1):
        state = risefall.step(state, False, rise, fall)
        assert 0 <= state.value <= top
        assert state.status == (DOWN if i == fall else UP), (i, state)
    for i in range(1, rise + 1):
        state = risefall.step(state, True, rise, fall)
        assert 0 <= state.value <= top
        assert state.status == (UP if i == rise else DOWN), (i, state)
    assert state == HealthState(UP, top)


@pytest.mark.parametrize("fall", [1, 2, 3, 7])
def test_unknown_goes_down_after_fall_failures(fall: int) -> None:
    """An unknown peer is declared down after exactly `fall` consecutive failures, and
    stays unknown before that."""
    state = risefall.initial(True, 2, fall)
    for i in range(1, fall + 1):
        state = risefall.step(state, False, 2, fall)
        assert state.status == (DOWN if i == fall else UNKNOWN)
