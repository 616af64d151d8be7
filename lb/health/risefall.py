"""Rise/fall counting the way HAProxy does it: one health integer per peer.

The integer runs from 0 to ``rise + fall - 1``. A peer that is up sits at the top; each
failure takes one off and it goes down when the value drops below ``rise`` (after ``fall``
consecutive failures), landing at 0. A peer that is down climbs one per pass and comes up
at ``rise`` (after ``rise`` consecutive passes), jumping to the top. A peer that has no
verdict yet (``unknown``) comes up on its first pass and goes down after ``fall`` failures.
Pure: no Twisted, no clock.
"""

from __future__ import annotations

from typing import NamedTuple

UP = "up"
DOWN = "down"
UNKNOWN = "unknown"


class HealthState(NamedTuple):
    status: str  # up | down | unknown
    value: int  # up/down: HAProxy's health integer; unknown: failures seen so far


def initial(checked: bool, rise: int, fall: int) -> HealthState:
    """Where a new peer starts: unknown when checks will decide, otherwise up."""
    if checked:
        return HealthState(UNKNOWN, 0)
    return HealthState(UP, rise + fall - 1)


def step(state: HealthState, ok: bool, rise: int, fall: int) -> HealthState:
    """The state after one check result."""
    top = rise + fall - 1
    status, value = state
    if status == UNKNOWN:
        if ok:
            return HealthState(UP, top)
        if value + 1 >= fall:
            return HealthState(DOWN, 0)
        return HealthState(UNKNOWN, value + 1)
    if status == UP:
        if ok:
            return HealthState(UP, top)
        value = min(value, top) - 1
        if value < rise:
            return HealthState(DOWN, 0)
        return HealthState(UP, value)
    # down
    if not ok:
        return HealthState(DOWN, 0)
    value += 1
    if value >= rise:
        return HealthState(UP, top)
    return HealthState(DOWN, value)
