"""Plans of small idempotent steps, as Flintlock runs them.

A step measures, then acts, then checks (``should_do``/``do``/``verify``). A plan is rebuilt
from reality after every step and run until it yields no step, so a master that dies between
two steps picks up at the first one whose ``should_do`` still holds. A step that is ``final``
(the plan's last, whose check covers all it promised) ends the plan once it checked out: a
last look would find nothing left, and costs a round of questions to every party.
"""

from __future__ import annotations

from typing import Protocol

from multiverse.core.errors import Conflict

__all__ = ["Plan", "Step", "execute"]


class Step(Protocol):
    name: str
    final: bool

    async def should_do(self) -> bool:
        """Whether reality still needs this step (read from the store or the agents)."""

    async def do(self) -> None: ...

    async def verify(self) -> None:
        """Raise if ``do`` did not get reality where it should be."""


class Plan(Protocol):
    name: str

    async def steps(self) -> list[Step]:
        """The steps left, in order; [] when done. Rebuilt every round."""


async def execute(plan: Plan, *, max_rounds: int = 50) -> list[str]:
    """Run ``plan`` to its end; the names of the steps run, in order."""
    done: list[str] = []
    for _round in range(max_rounds):
        steps = [step for step in await plan.steps() if await step.should_do()]
        if not steps:
            return done
        step = steps[0]
        await step.do()
        await step.verify()
        done.append(step.name)
        if step.final:
            return done
    raise Conflict(f"{plan.name}: still not done after {max_rounds} steps: {done[-3:]}")
