"""The command line's parser: commands, groups, options, arguments, help and usage errors.

Its decorators have click's shape (``@command()``, ``@option("-n", "--name")``,
``@argument("name")``), as the parse does: options anywhere among the arguments, ``--`` ends
them, ``--flag/--no-flag`` pairs, ``-h``/``--help`` on every command. It is ours rather than
click because a call's start is mostly imports on a slow host: ``import click`` took 45-70 ms
over ``python -c pass`` (it loads inspect, typing, enum, uuid, datetime), more than the whole
`--version` may. This module imports only ``os`` and ``sys``; help text loads ``textwrap``
when it is asked for.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs a start several milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import Any, TypeVar

    C = TypeVar("C", bound="Command")
    F = TypeVar("F")
    Callback = Callable[["Context", "Parameter", Any], Any]

__all__ = [
    "Argument",
    "BadParameter",
    "Choice",
    "Command",
    "CommandError",
    "Context",
    "Exit",
    "FloatRange",
    "Group",
    "IntRange",
    "Option",
    "Path",
    "UsageError",
    "argument",
    "command",
    "current_context",
    "echo",
    "group",
    "option",
]

HELP_NAMES = ("-h", "--help")
_WIDTH = 78  # as click's help, which people know


class CommandError(Exception):
    """A command ended in an error of its own (shown as ``Error: ...``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def show(self) -> None:
        sys.stderr.write(f"Error: {self.message}\n")


class UsageError(CommandError):
    """The command line was wrong: shown with the usage and how to get help."""

    def __init__(self, message: str, context: Context | None = None) -> None:
        super().__init__(message)
        self.context = context

    def show(self) -> None:
        context = self.context or _current
        if context is not None:
            sys.stderr.write(f"{context.usage()}\nTry '{context.path} --help' for help.\n\n")
        super().show()


class BadParameter(UsageError):
    """A value an option or argument does not take: raised by types and callbacks (which
    name the parameter where it is caught) or by a command naming it in ``param_hint``."""

    def __init__(self, message: str, param_hint: str | None = None) -> None:
        super().__init__(message)
        self.param_hint = param_hint

    def show(self) -> None:
        hint = f" for {self.param_hint}" if self.param_hint else ""
        self.message = f"Invalid value{hint}: {self.message}"
        super().show()


class Exit(Exception):
    """Stop with this exit code, having shown what there was to show (help, the version)."""

    def __init__(self, code: int = 0) -> None:
        super().__init__(code)
        self.code = code


def echo(message: object = "", err: bool = False, nl: bool = True) -> None:
    """Print ``message`` to stdout, or stderr with ``err``, and flush."""
    stream = sys.stderr if err else sys.stdout
    stream.write(f"{message}\n" if nl else str(message))
    stream.flush()


class Choice:
    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = list(choices)
        self.metavar = f"[{'|'.join(self.choices)}]"

    def __call__(self, text: str) -> str:
        if text not in self.choices:
            raise BadParameter(f"{text!r} is not one of {', '.join(map(repr, self.choices))}.")
        return text


class _Range:
    number: Callable[[Any], Any] = float
    noun = "float"

    def __init__(self, min: float | None = None, max: float | None = None) -> None:
        self.min, self.max = min, max
        if min is not None and max is not None:
            self.describe = f"{min}<=x<={max}"
        elif min is not None:
            self.describe = f"x>={min}"
        else:
            self.describe = f"x<={max}"
        self.metavar = f"{self.noun.upper()} RANGE"

    def __call__(self, text: str) -> Any:
        try:
            value = self.number(text)
        except ValueError:
            raise BadParameter(f"{text!r} is not a valid {self.noun}.") from None
        if (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            raise BadParameter(f"{text} is not in the range {self.describe}.")
        return value


class IntRange(_Range):
    number = int
    noun = "integer"


class FloatRange(_Range):
    pass


class Path:
    """A filesystem path, checked as asked, given as a ``pathlib.Path`` (imported only when a
    path is given: pathlib costs a start several milliseconds)."""

    def __init__(self, exists: bool = False, file_okay: bool = True, dir_okay: bool = True) -> None:
        self.exists, self.file_okay, self.dir_okay = exists, file_okay, dir_okay
        self.metavar = "DIRECTORY" if not file_okay else "FILE" if not dir_okay else "PATH"

    def __call__(self, text: str) -> Any:
        noun = {"FILE": "File", "DIRECTORY": "Directory"}.get(self.metavar, "Path")
        if self.exists and not os.path.exists(text):
            raise BadParameter(f"{noun} {text!r} does not exist.")
        if not self.file_okay and os.path.isfile(text):
            raise BadParameter(f"{noun} {text!r} is a file.")
        if not self.dir_okay and os.path.isdir(text):
            raise BadParameter(f"{noun} {text!r} is a directory.")
        from pathlib import Path

        return Path(text)


_METAVARS: dict[Any, str] = {str: "TEXT", int: "INTEGER", float: "FLOAT"}
# A plain number is a range without bounds: one place says what a bad one is.
_NUMBERS: dict[Any, _Range] = {int: IntRange(), float: FloatRange()}


def _convert(kind: Any, text: str) -> Any:
    if kind is str or kind is None:
        return text
    return _NUMBERS.get(kind, kind)(text)


class Parameter:
    """What options and arguments share: a name to pass the value as, a type, a default and
    a callback that may check or change the value."""

    name: str
    required: bool
    multiple = False

    def __init__(
        self,
        type: Any = None,
        default: Any = None,
        required: bool = False,
        callback: Callback | None = None,
        envvar: str | None = None,
    ) -> None:
        self.type = (
            type
            if type is not None
            else (_kind_of(default) if default is not None and not callable(default) else str)
        )
        self.default = default
        self.required = required
        self.callback = callback
        self.envvar = envvar

    def convert(self, text: str) -> Any:
        return _convert(self.type, text)

    def default_value(self) -> Any:
        value = self.default() if callable(self.default) else self.default
        if isinstance(value, str):
            return self.convert(value)
        if isinstance(value, int | float) and isinstance(self.type, _Range):
            return self.type.number(value)
        return value

    @property
    def display(self) -> str:
        raise NotImplementedError

    @property
    def metavar(self) -> str:
        return getattr(self.type, "metavar", None) or _METAVARS.get(self.type, "TEXT")


def _kind_of(value: Any) -> Any:
    return type(value) if isinstance(value, int | float) and not isinstance(value, bool) else str


class Option(Parameter):
    def __init__(
        self,
        decls: Sequence[str],
        *,
        is_flag: bool = False,
        multiple: bool = False,
        show_default: bool | str = False,
        help: str = "",
        hidden: bool = False,
        **kwargs: Any,
    ) -> None:
        names = [d for d in decls if d.startswith("-")]
        dests = [d for d in decls if not d.startswith("-")]
        self.off: list[str] = []
        self.on: list[str] = []
        for name in names:
            on, _, off = name.partition("/")
            self.on.append(on)
            if off:
                self.off.append(off)
        self.is_flag = is_flag or bool(self.off)
        if self.is_flag and "default" not in kwargs:
            kwargs["default"] = False
        longest = max(self.on, key=lambda n: (n.startswith("--"), len(n)))
        self.name = dests[0] if dests else longest.lstrip("-").replace("-", "_")
        self.multiple = multiple
        self.show_default = show_default
        self.help = help
        self.hidden = hidden
        super().__init__(**kwargs)
        if self.is_flag:
            self.type = bool

    @property
    def display(self) -> str:
        return " / ".join(f"'{n}'" for n in self.on)

    def default_value(self) -> Any:
        if self.multiple and self.default is None:
            return ()
        value = super().default_value()
        return tuple(value) if self.multiple else value

    def help_record(self) -> tuple[str, str]:
        names = ", ".join(sorted(self.on, key=lambda name: name.startswith("--")))
        if self.off:
            names = " / ".join([names, ", ".join(self.off)])
        if not self.is_flag:
            names += f" {self.metavar}"
        extra = []
        if self.show_default and self.default is not None and not (self.is_flag and not self.off):
            shown = self.default
            if isinstance(self.show_default, str):  # says what a computed default is
                shown = f"({self.show_default})"
            elif callable(self.default):
                shown = "(dynamic)"
            if self.off and isinstance(shown, bool):
                shown = (self.on if shown else self.off)[0].lstrip("-")
            extra.append(f"default: {shown}")
        if isinstance(self.type, _Range):
            extra.append(self.type.describe)
        if self.required:
            extra.append("required")
        text = self.help + (f"  [{'; '.join(extra)}]" if extra else "")
        return names, text.strip()


class Argument(Parameter):
    def __init__(self, name: str, nargs: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("required", nargs == 1 and kwargs.get("default") is None)
        super().__init__(**kwargs)
        self.name = name
        self.nargs = nargs

    @property
    def display(self) -> str:
        return f"'{self.name.upper()}'"

    def default_value(self) -> Any:
        if self.nargs == -1:
            return ()
        return super().default_value()

    def usage(self) -> str:
        text = self.name.upper() if self.required else f"[{self.name.upper()}]"
        return text + ("..." if self.nargs == -1 else "")


class Context:
    """One command's run: where it is in the command line (for messages), and which of its
    values were given rather than defaulted."""

    def __init__(self, command: Command, path: str) -> None:
        self.command = command
        self.path = path
        self.given: set[str] = set()

    def usage(self) -> str:
        return f"Usage: {self.path} {self.command.usage_tail()}"

    def is_default(self, name: str) -> bool:
        """Whether parameter ``name`` took its default (neither given nor from the
        environment)."""
        return name not in self.given


_current: Context | None = None


def current_context() -> Context:
    """The context of the command running now."""
    if _current is None:
        raise RuntimeError("no command is running")
    return _current


class Command:
    """A command: its function, called with its parameters' values as keyword arguments, and
    its help (the function's docstring unless ``help`` is given)."""

    def __init__(
        self,
        name: str,
        callback: Callable[..., Any] | None,
        params: Sequence[Parameter] = (),
        help: str | None = None,
        hidden: bool = False,
        trailing_command: bool = False,
    ) -> None:
        self.name = name
        self.callback = callback
        self.params = list(params)
        self.help = help if help is not None else (callback.__doc__ if callback else "") or ""
        self.hidden = hidden
        # `exec NAME CMD ARGS...`: from CMD on, every word is the command's, options too.
        self.trailing_command = trailing_command

    def short_help(self, limit: int) -> str:
        """The help's first sentence, cut to ``limit`` characters."""
        first = " ".join(_paragraphs(self.help)[0].split())
        first = first.split(". ")[0].rstrip(".") + "." if first else ""
        return first if len(first) <= limit else first[: limit - 2].rsplit(" ", 1)[0] + "..."

    def usage_tail(self) -> str:
        return " ".join(["[OPTIONS]", *(p.usage() for p in self.params if isinstance(p, Argument))])

    def main(self, args: Sequence[str], prog_name: str) -> Any:
        """Run the command line ``args``: what the command returned, or Exit, CommandError."""
        return self._run(list(args), Context(self, prog_name))

    def _run(self, args: list[str], context: Context) -> Any:
        global _current
        _current = context
        values, rest = self._parse(args, context)
        return self._invoke(values, rest, context)

    def _invoke(self, values: dict[str, Any], rest: list[str], context: Context) -> Any:
        if rest:
            raise UsageError(f"Got unexpected extra argument{'s' if len(rest) > 1 else ''} "
                             f"({' '.join(rest)})", context)  # fmt: skip
        assert self.callback is not None
        return self.callback(**values)

    def _parse(self, args: list[str], context: Context) -> tuple[dict[str, Any], list[str]]:
        """The values of this command's parameters in ``args``, and what is left of ``args``
        for a group's subcommand."""
        options = [p for p in self.params if isinstance(p, Option)]
        by_name: dict[str, tuple[Option, bool]] = {}
        for item in options:
            by_name.update({name: (item, True) for name in item.on})
            by_name.update({name: (item, False) for name in item.off})
        texts: dict[str, Any] = {}
        positional: list[str] = []
        # A group's options end at its subcommand's name; a trailing command's at its first word.
        fixed = sum(1 for p in self.params if isinstance(p, Argument) and p.nargs != -1)
        stop = 0 if isinstance(self, Group) else fixed if self.trailing_command else None
        while args:
            token = args.pop(0)
            if token == "--":
                positional.extend(args)
                args = []
                break
            if token in HELP_NAMES:
                echo(self.help_text(context))
                raise Exit(0)
            if not token.startswith("-") or token == "-":
                if stop is not None and len(positional) >= stop:
                    positional.extend([token, *args])
                    break
                positional.append(token)
                continue
            name, eq, attached = token.partition("=")
            if name not in by_name and not eq and not name.startswith("--") and len(name) > 2:
                name, attached, eq = token[:2], token[2:], "="  # -n3: a short option's value
            if name not in by_name:
                unknown = token.partition("=")[0]
                raise UsageError(
                    f"No such option {unknown!r}.{_did_you_mean(unknown, by_name)}", context
                )
            item, on = by_name[name]
            if item.is_flag:
                if eq:
                    raise UsageError(f"Option {name!r} does not take a value.", context)
                value: Any = on
            elif eq:
                value = attached
            elif args:
                value = args.pop(0)
            else:
                raise UsageError(f"Option {name!r} requires an argument.", context)
            if item.multiple:
                texts.setdefault(item.name, []).append(value)
            else:
                texts[item.name] = value
        return self._values(texts, positional, context), positional

    def _values(
        self, texts: dict[str, Any], positional: list[str], context: Context
    ) -> dict[str, Any]:
        """Each parameter's value, converted and checked, from the parsed texts; takes the
        arguments it uses off ``positional``."""
        values: dict[str, Any] = {}
        for item in self.params:
            given: Any = None
            if isinstance(item, Argument):
                if item.nargs == -1:
                    given = tuple(positional) or None
                    del positional[:]
                elif positional:
                    given = positional.pop(0)
            elif item.name in texts:
                given = texts[item.name]
            elif item.envvar and os.environ.get(item.envvar):
                given = os.environ[item.envvar]
                given = [given] if item.multiple else given
            try:
                if given is None:
                    if item.required:
                        kind = "option" if isinstance(item, Option) else "argument"
                        raise UsageError(f"Missing {kind} {item.display}.", context)
                    value = item.default_value()
                else:
                    context.given.add(item.name)
                    value = _converted(item, given)
                if item.callback is not None:
                    value = item.callback(context, item, value)
            except BadParameter as exc:
                raise UsageError(
                    f"Invalid value for {item.display}: {exc.message}", context
                ) from exc
            values[item.name] = value
        return values

    def help_text(self, context: Context) -> str:
        import textwrap

        lines = [context.usage(), ""]
        for paragraph in _paragraphs(self.help):
            lines.append(textwrap.indent(_wrap(paragraph, _WIDTH - 2), "  "))
            lines.append("")
        records = [p.help_record() for p in self.params if isinstance(p, Option) and not p.hidden]
        records.append((", ".join(HELP_NAMES), "Show this message and exit."))
        lines += ["Options:", *_columns(records)]
        return "\n".join(lines + self._more_help(context)).rstrip("\n")

    def _more_help(self, context: Context) -> list[str]:
        return []


def _converted(item: Parameter, given: Any) -> Any:
    if isinstance(item, Option) and item.is_flag:
        return given
    if isinstance(given, list | tuple):
        return tuple(item.convert(text) for text in given)
    return item.convert(given)


class Group(Command):
    """Commands under one name (``multiverse node drain``). ``lazy`` names commands by where
    they are ("module:attribute"), imported only when one is called or help lists them."""

    def __init__(self, *args: Any, lazy: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, Command] = {}
        self.lazy = dict(lazy or {})

    def add_command(self, command: Command, name: str | None = None) -> None:
        self.commands[name or command.name] = command

    def command(
        self, name: str | None = None, **kwargs: Any
    ) -> Callable[[Callable[..., Any]], Command]:
        def decorator(func: Callable[..., Any]) -> Command:
            made = _make(Command, func, name, kwargs)
            self.add_command(made)
            return made

        return decorator

    def get_command(self, name: str) -> Command | None:
        if name not in self.commands and name in self.lazy:
            module, _, attribute = self.lazy[name].partition(":")
            # __import__, not importlib.import_module: the statement's path, which
            # `python -X importtime` reports (it does not see importlib's).
            __import__(module)
            self.add_command(getattr(sys.modules[module], attribute), name)
        return self.commands.get(name)

    def list_commands(self) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def usage_tail(self) -> str:
        return "[OPTIONS] COMMAND [ARGS]..."

    def _invoke(self, values: dict[str, Any], rest: list[str], context: Context) -> Any:
        if not rest:  # named alone, as `multiverse node`: what it holds
            echo(self.help_text(context))
            raise Exit(0)
        name, *args = rest
        found = self.get_command(name)
        if found is None:
            raise UsageError(
                f"No such command {name!r}.{_did_you_mean(name, self.list_commands())}", context
            )
        if self.callback is not None:
            self.callback(**values)
        return found._run(args, Context(found, f"{context.path} {name}"))

    def _more_help(self, context: Context) -> list[str]:
        found = [(name, self.get_command(name)) for name in self.list_commands()]
        limit = _WIDTH - 6 - max(len(name) for name, _ in found)
        shown = [(n, item.short_help(limit)) for n, item in found if item and not item.hidden]
        return ["", "Commands:", *_columns(shown)] if shown else []


def _did_you_mean(word: str, known: Iterable[str]) -> str:
    """ " Did you mean 'x'?" for the known word closest to a mistyped one, if one is close."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _paragraphs(text: str) -> list[str]:
    """A docstring's paragraphs, dedented."""
    lines = text.expandtabs().split("\n")
    indents = [len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()]
    margin = min(indents, default=0)
    body = "\n".join([lines[0].strip(), *(line[margin:] for line in lines[1:])]).strip()
    return [p for p in body.split("\n\n") if p.strip()] or [""]


def _wrap(paragraph: str, width: int) -> str:
    """A paragraph refilled to ``width``, unless its lines are laid out by hand (indented)."""
    import textwrap

    if any(line.startswith(" ") for line in paragraph.split("\n")):
        return paragraph
    return textwrap.fill(" ".join(paragraph.split()), width)


def _columns(records: Sequence[tuple[str, str]]) -> list[str]:
    """Two columns, as click's help: names, then their help wrapped beside them."""
    import textwrap

    first = min(max((len(name) for name, _ in records), default=0), 30)
    lines = []
    for name, text in records:
        wrapped = textwrap.wrap(text, max(_WIDTH - first - 4, 20)) or [""]
        if len(name) > first:
            lines.append(f"  {name}")
            lines.extend(f"  {'':{first}}  {line}" for line in wrapped)
            continue
        lines.append(f"  {name:{first}}  {wrapped[0]}".rstrip())
        lines.extend(f"  {'':{first}}  {line}" for line in wrapped[1:])
    return lines


def _make(kind: type[C], func: Callable[..., Any], name: str | None, settings: dict[str, Any]) -> C:
    params = list(reversed(getattr(func, "__cmdline_params__", [])))
    name = name or func.__name__.lower().replace("_", "-")
    return kind(name, func, params, **settings)


def command(name: str | None = None, **settings: Any) -> Callable[[Callable[..., Any]], Command]:
    """Make a command of the function below; its options and arguments become its keyword
    arguments."""
    return lambda func: _make(Command, func, name, settings)


def group(name: str | None = None, **settings: Any) -> Callable[[Callable[..., Any]], Group]:
    return lambda func: _make(Group, func, name, settings)


def _attach(parameter: Parameter) -> Callable[[F], F]:
    def decorator(func: F) -> F:
        if isinstance(func, Command):
            func.params.insert(0, parameter)
        else:
            func.__dict__.setdefault("__cmdline_params__", []).append(parameter)
        return func

    return decorator


def option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    return _attach(Option(decls, **kwargs))


def argument(name: str, **kwargs: Any) -> Callable[[F], F]:
    return _attach(Argument(name, **kwargs))
