"""Environments as the API offers them: apply (or its dry run, diff), list, get, delete.

An environment is the set of instances carrying its name in the ``multiverse.env`` label; it
has no record of its own, so nothing can disagree with the instances. ``apply`` asks the pure
:func:`multiverse.core.environment.plan` what to do and the scheduler whether the new members
fit (spread groups included) before it changes anything; then an operation runs the steps
through :class:`Instances`, the same service (and so the same scheduler and reconciler) that a
`launch` uses: deletions first, then starts and stops, then creations round by round, each
round's templates filled from the instances the rounds before it brought to Running.
"""

from __future__ import annotations

import asyncio
import logging

from multiverse.core.environment import (
    ENV_LABEL,
    GROUP_LABEL,
    EnvironmentSpec,
    Member,
    Plan,
    StepKind,
    facts_of,
    plan,
    render,
)
from multiverse.core.errors import Conflict, NotFound
from multiverse.core.model import DesiredState, Instance, InstanceSpec, InstanceState
from multiverse.master.instances import Instances
from multiverse.master.operations import Operation
from multiverse.master.scheduler import Request, place_all
from multiverse.store.repository import Store

log = logging.getLogger("multiverse.master")


class Environments:
    def __init__(self, store: Store, instances: Instances) -> None:
        self.store = store
        self.instances = instances
        self._applying: dict[str, Operation] = {}  # environment -> its running apply

    async def all(self) -> dict[str, list[Instance]]:
        """Environment name -> its instances, by name."""
        found: dict[str, list[Instance]] = {}
        for instance in await self.store.list_instances():
            if name := instance.spec.labels.get(ENV_LABEL):
                found.setdefault(name, []).append(instance)
        return dict(sorted(found.items()))

    async def get(self, name: str) -> list[Instance]:
        members = (await self.all()).get(name)
        if not members:
            raise NotFound(
                f"environment {name!r} does not exist; `multiverse envs` lists the environments"
            )
        return members

    async def diff(self, spec: EnvironmentSpec, *, prune: bool, recreate: bool) -> Plan:
        """What apply would do; checked as apply checks it (placement included)."""
        current = [
            instance
            for instance in await self.store.list_instances()
            if instance.spec.labels.get(ENV_LABEL) == spec.name
            or any(instance.name == member.name for member in spec.members)
        ]
        steps = plan(spec, current, prune=prune, recreate=recreate)
        await self._check_placement(spec, steps, current)
        return steps

    async def apply(
        self, spec: EnvironmentSpec, *, prune: bool, recreate: bool
    ) -> tuple[Plan, Operation]:
        running = self._applying.get(spec.name)
        if running is not None and not running.done.is_set():
            raise Conflict(
                f"environment {spec.name} is being applied already (operation {running.id}); "
                "wait for it to end"
            )
        steps = await self.diff(spec, prune=prune, recreate=recreate)
        operation = self.instances.operations.start("apply", spec.name, self._run(spec, steps))
        self._applying[spec.name] = operation
        return steps, operation

    async def delete(self, name: str) -> tuple[list[Instance], Operation]:
        members = await self.get(name)
        for instance in members:
            await self.instances.delete(instance.name)

        async def gone() -> list[dict[str, str]]:
            await asyncio.gather(*(self.instances.until(i.id, None) for i in members))
            return [{"name": instance.name, "outcome": "deleted"} for instance in members]

        return members, self.instances.operations.start("delete", name, gone())

    async def _check_placement(
        self, spec: EnvironmentSpec, steps: Plan, current: list[Instance]
    ) -> None:
        """Refuse, before anything is created, what the scheduler cannot place."""
        leaving = set(steps.names(StepKind.DELETE, StepKind.RECREATE))
        nodes = await self.store.list_nodes()
        for instance in current:  # what a deletion frees counts as free
            if instance.name in leaving and instance.node_id:
                for node in nodes:
                    if node.id == instance.node_id:
                        node.allocated = node.allocated - instance.spec.resources
        spreading = {member.name for member in spec.members if member.spread}
        holding: dict[str, dict[str, str]] = {}
        for instance in current:
            group = instance.spec.labels.get(GROUP_LABEL, "")
            if instance.name in spreading and instance.name not in leaving and instance.node_id:
                holding.setdefault(group, {})[instance.node_id] = instance.name
        creating = [spec.member(name) for name in steps.names(StepKind.CREATE, StepKind.RECREATE)]
        place_all(
            [
                Request(
                    member.name,
                    InstanceSpec(member.name, member.cpus, member.memory, member.disk).resources,
                    member.selector,
                    member.group if member.spread else "",
                )
                for member in sorted(creating, key=spec.members.index)
            ],
            nodes,
            holding=holding,
        )

    async def _run(self, spec: EnvironmentSpec, steps: Plan) -> list[dict[str, str]]:
        done: list[dict[str, str]] = []
        leaving = steps.names(StepKind.DELETE, StepKind.RECREATE)
        await asyncio.gather(*(self._delete(name) for name in leaving))
        done += [{"name": name, "outcome": "deleted"} for name in steps.names(StepKind.DELETE)]
        for kind in (StepKind.STOP, StepKind.START):
            names = steps.names(kind)
            await asyncio.gather(*(self._set_state(name, kind) for name in names))
            done += [{"name": name, "outcome": f"{kind.value}ed"} for name in names]
        creating = set(steps.names(StepKind.CREATE, StepKind.RECREATE))
        for round_ in spec.levels():
            members = [member for member in round_ if member.name in creating]
            # One at a time through placement (each sees the ones before), then all boot.
            launched = [await self._launch(spec, member) for member in members]
            await asyncio.gather(*(self._settle(instance, member) for instance, member in launched))
            done += [{"name": member.name, "outcome": "created"} for member in members]
        # Everything as the file says, including what was already there and still booting.
        found = [(await self.store.find_instance(m.name), m) for m in spec.members]
        await asyncio.gather(*(self._settle(instance, member) for instance, member in found))
        log.info("environment %s applied: %d changes", spec.name, len(steps.steps))
        return done

    async def _delete(self, name: str) -> None:
        instance, _ = await self.instances.delete(name)
        await self.instances.until(instance.id, None)

    async def _set_state(self, name: str, kind: StepKind) -> None:
        if kind == StepKind.STOP:
            await self.instances.stop(name)
        else:
            await self.instances.start(name)

    async def _launch(self, spec: EnvironmentSpec, member: Member) -> tuple[Instance, Member]:
        facts = {
            instance.name: facts_of(instance)
            for instance in await self.store.list_instances(names=sorted(member.after))
        }
        user_data = render(spec, member, facts)
        labels = {ENV_LABEL: spec.name, **member.labels}
        instance, _ = await self.instances.launch(
            InstanceSpec(
                name=member.name, cpus=member.cpus, memory=member.memory, disk=member.disk,
                image=member.image, user_data=user_data, labels=labels,
            ),
            selector=member.selector,
            apart_from={ENV_LABEL: spec.name, GROUP_LABEL: member.group} if member.spread else None,
        )  # fmt: skip
        log.info("environment %s: launched %s", spec.name, member.name)
        return instance, member

    async def _settle(self, instance: Instance, member: Member) -> None:
        """Wait until the instance is as the file wants it: Running, or Stopped."""
        if member.state == DesiredState.RUNNING:
            await self.instances.until(instance.id, {InstanceState.RUNNING})
            return
        if (await self.store.get_instance(instance.id)).desired != DesiredState.STOPPED:
            # Just created: it boots once (its cloud-init runs), then stops.
            await self.instances.until(instance.id, {InstanceState.RUNNING})
            await self.instances.stop(member.name)
        await self.instances.until(instance.id, {InstanceState.STOPPED})
