"""Environments: several instances described in one file, and what ``apply`` must do for them.

Pure: a document (YAML text or its JSON form) becomes an :class:`EnvironmentSpec`; a spec and
the instances that exist become a :class:`Plan`; a member's cloud-init template and the
cluster's facts become its user-data. The client parses files with it (so errors point at a
line and column before anything is sent), the master parses the API body with it again and
executes the plan. Reading files is the caller's: a ``read`` function resolves ``cloud-init:
FILE`` references.

The file::

    name: k3s-lab
    instances:
      - name: server               # one instance
        cloud-init: server.yaml    # a single line is a file, relative to this one
      - name: agent-{n}            # a group: agent-1, agent-2
        count: 2
        spread: true               # no two on one node
        selector: {zone: a}
        cloud-init: |              # several lines are the template itself
          #!/bin/sh
          echo {{ instances.server.ipv4 }} > /etc/server

Templates are Jinja2, sandboxed, strict about undefined names, and see ``instances.NAME``
(``name``, ``ipv4``, ``node``; ``instances["agent-1"]`` for names with hyphens),
``groups.GROUP`` (a group's members in order; GROUP is the name without ``{n}``: ``agent``),
``member`` (itself: ``name``, ``n``, ``group``) and ``env`` (``name``). An instance is created after
every instance its template names; a cycle is an error.

Instances carry the environment's name in the label ``multiverse.env``, their group's in
``multiverse.group`` and a digest of their cloud-init template in ``multiverse.cloud-init``
(cloud-init runs once, at the first boot: a changed template means re-creating, as a changed
size does).
"""

from __future__ import annotations

import difflib
import enum
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from multiverse.core.errors import Conflict, InvalidArgument, MultiverseError
from multiverse.core.faults import ScheduledFault, parse_scheduled
from multiverse.core.model import (
    DEFAULT_CPUS,
    DEFAULT_DISK,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY,
    ENV_LABEL,
    DesiredState,
    Instance,
    InstanceSpec,
    validate_labels,
    validate_name,
)
from multiverse.core.sizes import format_size, parse_size

__all__ = [
    "CLOUD_INIT_LABEL",
    "ENV_LABEL",
    "GROUP_LABEL",
    "EnvironmentSpec",
    "Facts",
    "Member",
    "Plan",
    "Step",
    "StepKind",
    "facts_of",
    "parse_document",
    "parse_yaml",
    "plan",
    "render",
]

GROUP_LABEL = "multiverse.group"
CLOUD_INIT_LABEL = "multiverse.cloud-init"
RESERVED_PREFIX = "multiverse."
MAX_MEMBERS = 256  # per environment: a typo in a count should not launch a thousand VMs

_TOP_KEYS = ("name", "instances", "faults")
_ENTRY_KEYS = (
    "name", "count", "image", "cpus", "memory", "disk", "cloud-init", "spread", "selector",
    "state",
)  # fmt: skip
_TEMPLATE_NAMES = ("instances", "groups", "member", "env")
_GROUP_NAME = re.compile(r"\{n\}")

Path = tuple[str | int, ...]
Facts = Mapping[str, Any]  # what a template sees of one instance: name, ipv4, node


# ---- the spec ----


@dataclass(frozen=True)
class Member:
    """One instance the environment wants: a single entry, or one of a group's members."""

    name: str
    group: str  # the entry's name without {n} ("agent"); a single instance's own name
    n: int  # the member's number in its group, from 1; 1 for a single instance
    cpus: int
    memory: int
    disk: int
    image: str
    cloud_init: str  # the template, as written
    spread: bool
    selector: dict[str, str]
    state: DesiredState
    after: frozenset[str] = frozenset()  # members its template names: created before it

    @property
    def labels(self) -> dict[str, str]:
        """What it carries besides its environment's label."""
        labels = {GROUP_LABEL: self.group}
        if self.cloud_init:
            labels[CLOUD_INIT_LABEL] = template_digest(self.cloud_init)
        return labels


@dataclass(frozen=True)
class EnvironmentSpec:
    name: str
    members: tuple[Member, ...]  # dependencies first, otherwise in the file's order
    document: dict[str, Any] = field(default_factory=dict)  # the JSON form, templates inline
    # The ``faults:`` schedule, run by the client once the environment is up (not sent).
    faults: tuple[ScheduledFault, ...] = ()

    def member(self, name: str) -> Member:
        return next(member for member in self.members if member.name == name)

    def levels(self) -> list[list[Member]]:
        """Members in rounds: each round's templates name only earlier rounds' members."""
        level: dict[str, int] = {}
        for member in self.members:  # dependencies come first
            level[member.name] = max((level[dep] + 1 for dep in member.after), default=0)
        rounds: list[list[Member]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for member in self.members:
            rounds[level[member.name]].append(member)
        return rounds


def template_digest(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:16]


# ---- where things are, to say where a problem is ----


class _Source:
    """Locations of a document's parts: ``FILE:LINE:COLUMN`` for YAML, a path for JSON."""

    def __init__(self, filename: str = "", text: str = "") -> None:
        self.filename = filename
        self.lines = text.splitlines()
        self.values: dict[Path, yaml.Mark] = {}
        self.keys: dict[Path, yaml.Mark] = {}
        self.block: set[Path] = set()  # values written as | or > blocks
        self.files: dict[Path, tuple[str, str]] = {}  # cloud-init read from (name, text)

    def at(self, path: Path, *, key: bool = False) -> str:
        mark = (self.keys if key else self.values).get(path) or self.values.get(path)
        if mark is None:
            return _dotted(path) or "document"
        return f"{self.filename}:{mark.line + 1}:{mark.column + 1}"

    def in_template(self, path: Path, lineno: int, *needles: str) -> str:
        """Where line ``lineno`` (from 1) of the template at ``path`` is, and the first of
        ``needles`` found in it."""
        if path in self.files:
            name, text = self.files[path]
            return f"{name}:{lineno}:{_column(text.splitlines(), lineno - 1, needles)}"
        mark = self.values.get(path)
        if mark is None:
            return f"{_dotted(path)} (template line {lineno})"
        # A block's content starts on the line after its indicator.
        line = mark.line + lineno - (0 if path in self.block else 1)
        return f"{self.filename}:{line + 1}:{_column(self.lines, line, needles)}"


def _column(lines: Sequence[str], index: int, needles: Sequence[str]) -> int:
    text = lines[index] if 0 <= index < len(lines) else ""
    for needle in needles:
        if needle and (found := text.find(needle)) >= 0:
            return found + 1
    return len(text) - len(text.lstrip()) + 1


def _dotted(path: Path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class _Problems:
    def __init__(self, source: _Source) -> None:
        self.source = source
        self.found: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.found.append(f"{where}: {message}")

    def at(self, path: Path, message: str, *, key: bool = False) -> None:
        self.add(self.source.at(path, key=key), message)

    def raise_any(self) -> None:
        if self.found:
            raise InvalidArgument("\n".join(self.found))


# ---- reading YAML with its marks ----


def _load(text: str, source: _Source) -> Any:
    """The YAML document as plain values, recording each key's and value's mark."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source.filename}:{mark.line + 1}:{mark.column + 1}" if mark else source.filename
        raise InvalidArgument(f"{where}: not valid YAML: {exc.problem}") from exc
    finally:
        loader.dispose()
    if root is None:
        raise InvalidArgument(f"{source.filename}:1:1: the file is empty")
    problems = _Problems(source)

    def walk(node: yaml.Node, path: Path) -> Any:
        source.values[path] = node.start_mark
        if isinstance(node, yaml.MappingNode):
            value: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)
                if not isinstance(key, str):
                    problems.add(source.at((*path, str(key))), f"key {key!r} is not text")
                    continue
                source.keys[(*path, key)] = key_node.start_mark
                if key in value:
                    problems.at((*path, key), f"duplicate key {key!r}", key=True)
                    continue
                value[key] = walk(value_node, (*path, key))
            return value
        if isinstance(node, yaml.SequenceNode):
            return [walk(item, (*path, i)) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
            source.block.add(path)
        return loader.construct_object(node)

    document = walk(root, ())
    problems.raise_any()
    return document


# ---- parsing ----


def parse_yaml(text: str, filename: str, read: Callable[[str], str]) -> EnvironmentSpec:
    """An environment file; ``read(name)`` returns a ``cloud-init: FILE``'s text.

    Raises InvalidArgument listing every problem as ``FILE:LINE:COLUMN: message``.
    """
    source = _Source(filename, text)
    return _parse(_load(text, source), source, read)


def parse_document(document: Any) -> EnvironmentSpec:
    """The JSON form (the API's body): as the file, with every cloud-init inline."""
    return _parse(document, _Source(), None)


def _parse(document: Any, source: _Source, read: Callable[[str], str] | None) -> EnvironmentSpec:
    problems = _Problems(source)
    if not isinstance(document, dict):
        problems.at((), "expected a mapping with name and instances")
        problems.raise_any()
    _unknown_keys(document, (), _TOP_KEYS, problems)
    name = document.get("name")
    if not isinstance(name, str) or not name:
        problems.at(("name",) if "name" in document else (), "the environment needs a name")
        name = ""
    else:
        _check(problems, ("name",), lambda: validate_name(name, "environment"))
    entries = document.get("instances")
    if not isinstance(entries, list) or not entries:
        problems.at(
            ("instances",) if "instances" in document else (),
            "instances must be a list of at least one instance",
        )
        entries = []
    members: list[tuple[Member, Path]] = []
    inline: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        path: Path = ("instances", index)
        if not isinstance(entry, dict):
            problems.at(path, "each instance must be a mapping with at least a name")
            continue
        _unknown_keys(entry, path, _ENTRY_KEYS, problems)
        cloud_init = _cloud_init(entry, path, source, read, problems)
        inline.append({**entry, "cloud-init": cloud_init} if cloud_init else entry)
        members += [(m, path) for m in _expand(entry, path, cloud_init, problems)]
    seen: dict[str, Path] = {}
    group_of: dict[str, tuple[Path, bool]] = {}  # group label -> its entry, a group's?
    for member, path in members:
        grouped = member.group != member.name
        other, other_grouped = group_of.setdefault(member.group, (path, grouped))
        if other != path and member.n == 1 and (grouped or other_grouped):
            problems.at(
                (*path, "name"),
                f"group {member.group!r} is also the group of {source.at((*other, 'name'))}; "
                "name them apart",
            )
        if member.name in seen:
            problems.at(
                (*path, "name"),
                f"duplicate instance name {member.name!r} "
                f"(also at {source.at(seen[member.name] + ('name',))})",
            )
        seen.setdefault(member.name, path)
    if len(members) > MAX_MEMBERS:
        problems.at(("instances",), f"{len(members)} instances; at most {MAX_MEMBERS}")
    labels = {m.name: {ENV_LABEL: name, **m.labels} for m, _ in members}
    schedule = _schedule(document.get("faults"), labels, problems)
    problems.raise_any()
    ordered = _order(_dependencies(name, members, source, problems), source, problems)
    problems.raise_any()
    return EnvironmentSpec(name, tuple(ordered), {"name": name, "instances": inline}, schedule)


def _schedule(
    entries: Any, labels: Mapping[str, Mapping[str, str]], problems: _Problems
) -> tuple[ScheduledFault, ...]:
    """The ``faults:`` section, in the order they start; ``labels``: each member's."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        problems.at(("faults",), "faults must be a list")
        return ()
    schedule: list[ScheduledFault] = []
    for index, entry in enumerate(entries):
        try:
            schedule.append(parse_scheduled(entry, labels))
        except MultiverseError as exc:
            problems.at(("faults", index), exc.message)
    return tuple(sorted(schedule, key=lambda s: s.at))


def _unknown_keys(
    mapping: dict[str, Any], path: Path, known: Sequence[str], problems: _Problems
) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
            problems.at((*path, key), f"unknown key {key!r}{hint}", key=True)


def _check(problems: _Problems, path: Path, check: Callable[[], object]) -> bool:
    try:
        check()
    except MultiverseError as exc:
        problems.at(path, exc.message)
        return False
    return True


def _cloud_init(
    entry: dict[str, Any],
    path: Path,
    source: _Source,
    read: Callable[[str], str] | None,
    problems: _Problems,
) -> str:
    value = entry.get("cloud-init", "")
    where = (*path, "cloud-init")
    if not isinstance(value, str):
        problems.at(where, "cloud-init must be text: a file name, or the template itself")
        return ""
    if read is None or "\n" in value or not value.strip():
        return value
    try:
        text = read(value.strip())
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        problems.at(where, f"cannot read cloud-init file {value.strip()!r}: {reason}")
        return ""
    source.files[where] = (value.strip(), text)
    return text


def _expand(
    entry: dict[str, Any], path: Path, cloud_init: str, problems: _Problems
) -> list[Member]:
    """The entry's members: itself, or ``count`` of them named from ``{n}``."""
    before = len(problems.found)
    pattern = entry.get("name")
    if not isinstance(pattern, str) or not pattern:
        problems.at((*path, "name") if "name" in entry else path, "each instance needs a name")
        return []
    grouped = "{n}" in pattern
    count = entry.get("count", 1)
    if "count" in entry and not grouped:
        problems.at((*path, "name"), f"a group's name needs {{n}}, e.g. {pattern}-{{n}}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        problems.at((*path, "count"), f"count must be a whole number of at least 1, not {count!r}")
        count = 1
    elif count > MAX_MEMBERS:
        problems.at((*path, "count"), f"count {count} is over the limit of {MAX_MEMBERS}")
        count = 1
    group = _GROUP_NAME.sub("", pattern).strip("-") if grouped else pattern
    cpus = entry.get("cpus", DEFAULT_CPUS)
    if isinstance(cpus, bool) or not isinstance(cpus, int):
        problems.at((*path, "cpus"), f"cpus must be a whole number, not {cpus!r}")
        cpus = DEFAULT_CPUS
    sizes = {}
    for key, default in (("memory", DEFAULT_MEMORY), ("disk", DEFAULT_DISK)):
        value = entry.get(key, default)
        sizes[key] = default
        if isinstance(value, bool) or not isinstance(value, int | str):
            problems.at((*path, key), f"invalid size {value!r}: use e.g. 512M or 4G")
            continue
        try:
            sizes[key] = parse_size(value)
        except MultiverseError as exc:
            problems.at((*path, key), exc.message)
    image = entry.get("image", DEFAULT_IMAGE)
    if not isinstance(image, str):
        problems.at((*path, "image"), f"image must be a name, not {image!r}")
        image = DEFAULT_IMAGE
    spread = entry.get("spread", False)
    if not isinstance(spread, bool):
        problems.at((*path, "spread"), f"spread must be true or false, not {spread!r}")
    selector = entry.get("selector", {})
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
        for k, v in selector.items()
    ):
        problems.at((*path, "selector"), "selector must map label keys to values")
        selector = {}
    selector = {key: str(value) for key, value in selector.items()}
    _check(problems, (*path, "selector"), lambda: validate_labels(selector))
    state = entry.get("state", DesiredState.RUNNING.value)
    if state not in (DesiredState.RUNNING.value, DesiredState.STOPPED.value):
        problems.at((*path, "state"), f"state must be running or stopped, not {state!r}")
        state = DesiredState.RUNNING.value
    if len(problems.found) > before:
        return []
    probes = {  # one field at a time, so that a problem points at its line
        "cpus": InstanceSpec("x", cpus=cpus),
        "memory": InstanceSpec("x", memory=sizes["memory"]),
        "disk": InstanceSpec("x", disk=sizes["disk"]),
        "image": InstanceSpec("x", image=image),
    }
    for key, probe in probes.items():
        if not _check(problems, (*path, key) if key in entry else path, probe.validate):
            return []
    members = []
    for n in range(1, count + 1):
        name = pattern.replace("{n}", str(n))
        if not _check(problems, (*path, "name"), functools.partial(validate_name, name)):
            return []
        members.append(
            Member(
                name=name,
                group=group,
                n=n,
                cpus=cpus,
                memory=sizes["memory"],
                disk=sizes["disk"],
                image=image,
                cloud_init=cloud_init,
                spread=bool(spread),
                selector=selector,
                state=DesiredState(state),
            )
        )
    return members


# ---- templates ----

_jinja = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


@dataclass(frozen=True)
class _Ref:
    kind: str  # "instances" or "groups"
    name: str
    lineno: int


def _references(ast: nodes.Template) -> tuple[list[_Ref], list[int]]:
    """``instances.X``/``groups.X`` named in a template, and lines where the name is not a
    literal (``instances[x]``), which would hide what must be created first."""
    found: list[_Ref] = []
    dynamic: list[int] = []
    subscripted: set[int] = set()
    for attr in ast.find_all(nodes.Getattr):
        if isinstance(attr.node, nodes.Name) and attr.node.name in ("instances", "groups"):
            found.append(_Ref(attr.node.name, attr.attr, attr.lineno))
            subscripted.add(id(attr.node))
    for item in ast.find_all(nodes.Getitem):
        if isinstance(item.node, nodes.Name) and item.node.name in ("instances", "groups"):
            subscripted.add(id(item.node))
            if isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
                found.append(_Ref(item.node.name, item.arg.value, item.lineno))
            else:
                dynamic.append(item.lineno)
    for name in ast.find_all(nodes.Name):
        if name.name in ("instances", "groups") and id(name) not in subscripted:
            dynamic.append(name.lineno)
    return found, dynamic


def _dependencies(
    env_name: str, members: list[tuple[Member, Path]], source: _Source, problems: _Problems
) -> list[tuple[Member, Path]]:
    """Each member with ``after`` filled from its template; problems with their lines."""
    names = {member.name for member, _ in members}
    groups: dict[str, list[str]] = {}
    for member, _ in members:
        if member.group != member.name:
            groups.setdefault(member.group, []).append(member.name)
    checked: dict[Path, frozenset[str] | None] = {}
    result = []
    for member, path in members:
        where = (*path, "cloud-init")
        if where not in checked:
            checked[where] = _check_template(member, where, names, groups, source, problems)
            if checked[where] is not None:
                # Made-up facts of every member: what renders with them renders for real.
                everyone = [other for other, _ in members]
                trial = {m.name: {"name": m.name, "ipv4": "192.0.2.1", "node": "node"}
                         for m in everyone}  # fmt: skip
                try:
                    _render(member, everyone, trial, env_name)
                except MultiverseError as exc:
                    problems.at(where, exc.message)
        after = checked[where]
        if after is not None:
            result.append((_with(member, after), path))
    return result


def _check_template(
    member: Member,
    where: Path,
    names: set[str],
    groups: Mapping[str, list[str]],
    source: _Source,
    problems: _Problems,
) -> frozenset[str] | None:
    if not member.cloud_init:
        return frozenset()
    try:
        ast = _jinja.parse(member.cloud_init)
    except TemplateSyntaxError as exc:
        problems.add(source.in_template(where, exc.lineno), f"template: {exc.message}")
        return None
    before = len(problems.found)
    for unknown in sorted(meta.find_undeclared_variables(ast) - set(_TEMPLATE_NAMES)):
        problems.add(
            source.in_template(where, _first_line(member.cloud_init, unknown), unknown),
            f"template names {unknown!r}; it can use {', '.join(_TEMPLATE_NAMES)}",
        )
    refs, dynamic = _references(ast)
    for lineno in dynamic:
        problems.add(
            source.in_template(where, lineno),
            "template: name instances and groups literally (instances.NAME, "
            "instances['NAME'], groups.GROUP), so that apply knows what to create first",
        )
    after: set[str] = set()
    for ref in refs:
        known = names if ref.kind == "instances" else groups
        if ref.name not in known:
            close = difflib.get_close_matches(ref.name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            what = "instance" if ref.kind == "instances" else "group"
            problems.add(
                source.in_template(where, ref.lineno, f"{ref.kind}.{ref.name}", ref.name),
                f"template names {what} {ref.name!r}, which the file does not define{hint}",
            )
            continue
        after.update([ref.name] if ref.kind == "instances" else groups[ref.name])
    return frozenset(after) if len(problems.found) == before else None


def _first_line(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    return 1


def _with(member: Member, after: frozenset[str]) -> Member:
    return Member(**{**member.__dict__, "after": after})


def _order(
    members: list[tuple[Member, Path]], source: _Source, problems: _Problems
) -> list[Member]:
    """Dependencies first, the file's order otherwise; a cycle is a problem."""
    pending = {member.name: (member, path) for member, path in members}
    ordered: list[Member] = []
    done: set[str] = set()
    while pending:
        ready = [name for name, (member, _) in pending.items() if member.after <= done]
        if not ready:
            cycle = _cycle({name: member.after for name, (member, _) in pending.items()})
            _, path = pending[cycle[0]]
            problems.at(
                (*path, "cloud-init"),
                "cloud-init templates refer to each other in a cycle: " + " -> ".join(cycle),
            )
            return []
        for name in ready:
            ordered.append(pending.pop(name)[0])
            done.add(name)
    return ordered


def _cycle(edges: Mapping[str, Iterable[str]]) -> list[str]:
    """One cycle among ``edges`` (every node left has an edge into the rest)."""
    start = next(iter(edges))
    path = [start]
    while True:
        step = next(dep for dep in sorted(edges[path[-1]]) if dep in edges)
        if step in path:
            return [*path[path.index(step) :], step]
        path.append(step)


def render(spec: EnvironmentSpec, member: Member, facts: Mapping[str, Facts]) -> str:
    """The member's user-data: its template filled with ``facts`` of the instances that
    exist (by name; see :func:`facts_of`)."""
    return _render(member, spec.members, facts, spec.name)


def facts_of(instance: Instance) -> dict[str, str]:
    """What templates see of an instance."""
    return {"name": instance.name, "ipv4": instance.ipv4, "node": instance.node_name}


def _render(
    member: Member, members: Sequence[Member], facts: Mapping[str, Facts], env_name: str
) -> str:
    if not member.cloud_init:
        return ""
    groups: dict[str, list[Facts]] = {}
    for other in members:  # in the file's order, so a group's members come by number
        if other.name in facts and other.group != other.name:
            groups.setdefault(other.group, []).append(facts[other.name])
    context = {
        "instances": dict(facts),
        "groups": groups,
        "member": {"name": member.name, "n": member.n, "group": member.group},
        "env": {"name": env_name},
    }
    try:
        return _jinja.from_string(member.cloud_init).render(context)
    except TemplateError as exc:
        raise InvalidArgument(f"template of {member.name}: {exc.message or exc}") from exc


# ---- the plan ----


class StepKind(enum.StrEnum):
    CREATE = "create"
    RECREATE = "recreate"  # delete, then create anew (--recreate)
    START = "start"
    STOP = "stop"
    DELETE = "delete"  # no longer in the file (--prune)


@dataclass(frozen=True)
class Step:
    kind: StepKind
    name: str
    detail: str = ""

    def json(self) -> dict[str, str]:
        return {"action": self.kind.value, "name": self.name, "detail": self.detail}


@dataclass(frozen=True)
class Plan:
    environment: str
    steps: tuple[Step, ...]
    kept: tuple[str, ...] = ()  # instances of the environment the file no longer lists

    def json(self) -> dict[str, Any]:
        return {
            "name": self.environment,
            "actions": [step.json() for step in self.steps],
            "kept": list(self.kept),
        }

    def names(self, *kinds: StepKind) -> list[str]:
        return [step.name for step in self.steps if step.kind in kinds]


def plan(
    spec: EnvironmentSpec,
    current: Sequence[Instance],
    *,
    prune: bool = False,
    recreate: bool = False,
) -> Plan:
    """What ``apply`` does to get from ``current`` (the instances carrying the environment's
    label, and any other with a member's name) to ``spec``; raises Conflict, changing
    nothing, where a member cannot be changed in place."""
    by_name = {instance.name: instance for instance in current}
    wanted = {member.name for member in spec.members}
    steps: list[Step] = []
    refused: list[str] = []
    for have in current:
        owner = have.spec.labels.get(ENV_LABEL)
        if have.name in wanted and owner != spec.name:
            refused.append(
                f"instance {have.name} exists outside environment {spec.name}"
                + (f" (in environment {owner})" if owner else "")
                + "; rename the file's instance or delete the existing one"
            )
        elif have.name in wanted and have.desired == DesiredState.DELETED:
            refused.append(f"instance {have.name} is being deleted; apply again once it is gone")
    kept = tuple(
        sorted(
            name
            for name, have in by_name.items()
            if name not in wanted and have.spec.labels.get(ENV_LABEL) == spec.name
        )
    )
    if prune:
        steps += [Step(StepKind.DELETE, name, "not in the file") for name in kept]
        kept = ()
    for member in spec.members:
        instance = by_name.get(member.name)
        if instance is None:
            steps.append(Step(StepKind.CREATE, member.name, _shape(member)))
            continue
        differences = _differences(member, instance)
        if differences and recreate:
            steps.append(Step(StepKind.RECREATE, member.name, "; ".join(differences)))
        elif differences:
            refused.append(
                f"{member.name}: {'; '.join(differences)}: delete and re-create it "
                "(apply --recreate does)"
            )
        elif member.state != instance.desired:
            kind = StepKind.START if member.state == DesiredState.RUNNING else StepKind.STOP
            steps.append(Step(kind, member.name))
    if refused:
        raise Conflict("\n".join(refused))
    return Plan(spec.name, tuple(steps), kept)


def _shape(member: Member) -> str:
    return (
        f"{member.image}, {member.cpus} cpus, {format_size(member.memory)} memory, "
        f"{format_size(member.disk)} disk"
    )


def _differences(member: Member, instance: Instance) -> list[str]:
    """What differs that only re-creating changes."""
    have = instance.spec
    found = []
    if have.image != member.image:
        found.append(f"image {have.image} -> {member.image}")
    if have.cpus != member.cpus:
        found.append(f"cpus {have.cpus} -> {member.cpus}")
    for key in ("memory", "disk"):
        old, new = getattr(have, key), getattr(member, key)
        if old != new:
            found.append(f"{key} {format_size(old)} -> {format_size(new)}")
    if have.labels.get(CLOUD_INIT_LABEL, "") != member.labels.get(CLOUD_INIT_LABEL, ""):
        found.append("cloud-init changed (it runs at the first boot only)")
    return found
