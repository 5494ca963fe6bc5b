"""The command line's parser (multiverse.client.cmdline): what it takes, what it refuses, and
how the ``multiverse`` executable reports each (exit code, message on stderr)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from multiverse.client import cmdline
from multiverse.main import EXIT_USAGE, run


def _strict(_ctx: cmdline.Context, _param: cmdline.Parameter, value: str | None) -> str | None:
    if value == "bad":
        raise cmdline.BadParameter("not that one")
    return value


def make_tool(seen: dict[str, Any]) -> cmdline.Group:
    """A small tool in the shape of ours: a group, a command with every kind of parameter,
    one that passes unknown options on, and a nested group."""

    @cmdline.group(name="tool")
    def tool() -> None:
        """A tool for tests."""

    @tool.command()
    @cmdline.option("-n", "--name", help="A name.")
    @cmdline.option("-c", "--cpus", type=cmdline.IntRange(1), default=1, show_default=True)
    @cmdline.option("--ratio", type=cmdline.FloatRange(0, 1), default=0.5)
    @cmdline.option("--mode", type=cmdline.Choice(["fast", "safe"]), default="safe")
    @cmdline.option("--nat/--no-nat", default=True, show_default=True, help="NAT.")
    @cmdline.option("--all", "all_", is_flag=True)
    @cmdline.option("-p", "--publish", "ports", multiple=True)
    @cmdline.option("--token", envvar="TOOL_TOKEN", default="")
    @cmdline.option("--pick", callback=_strict)
    @cmdline.option("--file", type=cmdline.Path(exists=True, dir_okay=False))
    @cmdline.argument("image", default="tiny")
    def launch(**values: Any) -> None:
        """Launch something.

        A second paragraph, which stays out of the command list."""
        seen.update(values, given=cmdline.current_context().given)

    @tool.command(name="exec", trailing_command=True)
    @cmdline.option("-t", "--tty", is_flag=True)
    @cmdline.argument("name")
    @cmdline.argument("command", nargs=-1, required=True)
    def exec_(tty: bool, name: str, command: tuple[str, ...]) -> int:
        seen.update(tty=tty, name=name, command=command)
        return 7

    @cmdline.group()
    def node() -> None:
        """Nodes."""

    tool.add_command(node)

    @node.command()
    @cmdline.argument("names", nargs=-1)
    def drain(names: tuple[str, ...]) -> None:
        seen.update(drained=names)

    return tool


def call(args: list[str]) -> tuple[int, dict[str, Any]]:
    seen: dict[str, Any] = {}
    return run(make_tool(seen), args), seen


def test_options_anywhere_in_any_spelling_and_defaults_converted() -> None:
    code, seen = call(["launch", "debian", "--cpus=4", "-nweb", "--no-nat", "-p", "80:80",
                       "--publish", "443:443", "--ratio", "1", "--all"])  # fmt: skip
    assert code == 0
    assert seen["image"] == "debian" and seen["name"] == "web" and seen["cpus"] == 4
    assert seen["nat"] is False and seen["all_"] is True and seen["ratio"] == 1.0
    assert seen["ports"] == ("80:80", "443:443") and seen["mode"] == "safe"
    assert seen["given"] == {"image", "cpus", "name", "nat", "ports", "ratio", "all_"}

    code, seen = call(["launch"])
    assert code == 0
    assert seen["image"] == "tiny" and seen["cpus"] == 1 and seen["nat"] is True
    assert seen["ports"] == () and seen["name"] is None and seen["given"] == set()


def test_an_environment_variable_stands_for_its_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOL_TOKEN", "from-env")
    assert call(["launch"])[1]["token"] == "from-env"
    assert call(["launch", "--token", "given"])[1]["token"] == "given"


def test_a_path_is_checked_and_given_as_a_path(tmp_path: Path) -> None:
    file = tmp_path / "user-data"
    file.write_text("#cloud-config\n")
    code, seen = call(["launch", "--file", str(file)])
    assert code == 0 and seen["file"] == file and isinstance(seen["file"], Path)


def test_a_trailing_command_takes_every_word_from_its_first_on() -> None:
    code, seen = call(["exec", "box", "ls", "-la", "-t", "--help"])
    assert code == 7 and seen["tty"] is False and seen["command"] == ("ls", "-la", "-t", "--help")
    code, seen = call(["exec", "-t", "box", "--", "sh", "-c", "echo --help"])
    assert seen["tty"] is True and seen["command"] == ("sh", "-c", "echo --help")
    # Before the command, options are the command line's own.
    code, seen = call(["exec", "box", "-t", "--", "true"])
    assert seen["tty"] is True and seen["command"] == ("true",)


def test_a_nested_group_runs_its_command() -> None:
    code, seen = call(["node", "drain", "a", "b"])
    assert code == 0 and seen["drained"] == ("a", "b")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["launch", "--zzz"], "No such option '--zzz'.\n"),
        (["launch", "--cpu", "2"], "No such option '--cpu'. Did you mean '--cpus'?"),
        (["launch", "--cpus", "x"], "for '-c' / '--cpus': 'x' is not a valid integer."),
        (["launch", "--cpus", "0"], "for '-c' / '--cpus': 0 is not in the range x>=1."),
        (["launch", "--ratio", "2"], "0<=x<=1"),
        (["launch", "--mode", "slow"], "'slow' is not one of 'fast', 'safe'."),
        (["launch", "--name"], "Option '--name' requires an argument."),
        (["launch", "--all=yes"], "Option '--all' does not take a value."),
        (["launch", "--pick", "bad"], "Invalid value for '--pick': not that one"),
        (["launch", "--file", "/nonexistent/file"], "File '/nonexistent/file' does not exist."),
        (["launch", "--file", "/"], "File '/' is a directory."),
        (["launch", "a", "b"], "Got unexpected extra argument (b)"),
        (["exec", "box"], "Missing argument 'COMMAND'."),
        (["exec", "--bogus", "box", "true"], "No such option '--bogus'."),
        (["nosuch"], "No such command 'nosuch'.\n"),
        (["lanch"], "No such command 'lanch'. Did you mean 'launch'?"),
        (["node", "nosuch"], "No such command 'nosuch'."),
    ],
)
def test_bad_input_is_a_usage_error_that_runs_nothing(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, seen = call(args)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and seen == {}
    assert message in err
    assert "Usage: multiverse " in err and "--help' for help." in err


def test_help_shows_usage_options_defaults_and_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, seen = call(["launch", "--help"])
    out = capsys.readouterr().out
    assert code == 0 and seen == {}
    assert out.startswith("Usage: multiverse launch [OPTIONS] [IMAGE]\n\n  Launch something.\n")
    assert "-c, --cpus INTEGER RANGE" in out and "[default: 1; x>=1]" in out
    assert "--nat / --no-nat" in out and "[default: nat]" in out
    assert "--mode [fast|safe]" in out and "-h, --help" in out

    assert call(["-h"])[0] == 0
    out = capsys.readouterr().out
    assert "Commands:" in out and "launch  Launch something." in out and "node    Nodes." in out
    assert "second paragraph" not in out

    # A group named without a command shows its help.
    assert call(["node"])[0] == 0
    assert "drain" in capsys.readouterr().out


def test_a_lazy_group_imports_a_command_only_when_it_is_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("lazy_commands_for_test")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    group = cmdline.Group("tool", None, lazy={"hello": f"{module.__name__}:hello"})

    @cmdline.command()
    def hello() -> int:
        return 3

    module.hello = hello  # type: ignore[attr-defined]
    assert group.commands == {}
    assert run(group, ["hello"]) == 3 and set(group.commands) == {"hello"}


def test_the_executable_reports_usage_errors_on_stderr_with_exit_code_1() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "multiverse", "launch", "--cpus", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert "Error: Invalid value for '-c' / '--cpus': 0 is not in the range x>=1." in done.stderr
    version = subprocess.run([sys.executable, "-m", "multiverse", "--version"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert version.returncode == 0 and version.stdout == "multiverse, version 0.1.0\n"


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`multiverse ... | head -1`: no traceback for the broken pipe, exit code 1 (as click's)."""
    flood = (
        "import sys\n"
        "from multiverse.client import cmdline\n"
        "from multiverse.main import run\n"
        "@cmdline.command()\n"
        "def flood() -> None:\n"
        "    for i in range(10**6):\n"
        "        cmdline.echo(f'line {i}')\n"
        "sys.exit(run(flood, []))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", flood], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline() == b"line 0\n"
        process.stdout.close()
        assert process.wait(timeout=60) == EXIT_USAGE
        assert process.stderr.read() == b""
    finally:
        process.kill()
        process.wait()
