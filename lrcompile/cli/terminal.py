"""Where the CLI meets the terminal: exit codes, one-line user errors, signals, progress bars."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator

import click

from lrcompile.errors import LrcompileError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3  # a bug in lrcompile: one line, the traceback under -v
EXIT_SIGINT = 130  # 128 + SIGINT, as shells report it
EXIT_SIGTERM = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """Raised by the SIGTERM handler, so that cleanup (finally blocks) runs as for Ctrl-C."""


def on_sigterm(signum, frame) -> None:
    raise Terminated


# How the library names an option in a message: `field` or `field=value` (a CompileConfig field or
# a keyword of the API); the CLI shows the flag instead.
_FIELD = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def as_flags(text: str) -> str:
    """``text`` with the library's `field` and `field=value` spelled as the flags of the running
    command (or of another command that has the option), e.g. `verify=False` -> --no-verify."""
    context = click.get_current_context(silent=True)
    commands = [context.command] if context is not None else []
    root = context.find_root() if context is not None else None
    if root is not None and isinstance(root.command, click.Group):
        commands += list(root.command.commands.values())
    options: dict[str, click.Option] = {}
    for command in reversed(commands):  # the running command's options win
        options |= {p.name: p for p in command.params if isinstance(p, click.Option)}
    return _FIELD.sub(lambda match: _flag(match, options), text)


def _flag(match: re.Match, options: dict[str, click.Option]) -> str:
    name, value = match.group(1), match.group(2)
    option = options.get(name)
    if option is None:
        return name if value is None else f"{name}={value}"
    flag = max(option.opts, key=len)
    if value is None:
        return flag
    if option.is_flag:
        return flag if value == "True" else max(option.secondary_opts or [flag], key=len)
    return f"{flag} {value}"


class FlagFormatter(logging.Formatter):
    """Log records with the library's option names spelled as flags (``as_flags``)."""

    def format(self, record: logging.LogRecord) -> str:
        return as_flags(super().format(record))


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns an ``LrcompileError`` into one line on stderr and exit code 2, and an interruption
    (Ctrl-C, SIGTERM) into one line and 130/143; outputs are atomic, so nothing partial remains."""
    try:
        yield
    except LrcompileError as error:
        click.echo(f"lrcompile: error: {as_flags(str(error))}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("lrcompile: interrupted; no output written", err=True)
        sys.exit(EXIT_SIGINT)
    except Terminated:
        click.echo("lrcompile: terminated; no output written", err=True)
        sys.exit(EXIT_SIGTERM)


class Progress:
    """Progress bars on stderr, one per stage of long work, only when stderr is a terminal."""

    def __init__(self) -> None:
        self._bar = None
        self._stage = ""
        self._done = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._finish()

    def __call__(self, stage: str, done: int, total: int, detail: str) -> None:
        if not sys.stderr.isatty():
            return
        if stage != self._stage:
            self._finish()
            self._stage, self._done = stage, 0
            self._bar = click.progressbar(
                length=total,
                label=stage,
                file=sys.stderr,
                show_eta=True,
                show_pos=True,
                item_show_func=lambda item: item,
            )
        self._bar.update(max(0, done - self._done), detail)
        self._done = done

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.render_finish()
            self._bar = None
