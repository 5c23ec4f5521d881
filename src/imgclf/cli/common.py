"""What every command shares: one-line usage errors, the runtime flags, the error-to-exit-code rule."""

from __future__ import annotations

import argparse

from imgclf.config.cli_args import add_setting_flags, given
from imgclf.config.settings import RUNTIME_FIELDS

# progress bars are on at a terminal, off in the Python API
CLI_RUNTIME_DEFAULTS = {"progress": True}


class UsageError(ValueError):
    """A bad command line; printed as one line with exit code 2, like every other user error."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are :class:`UsageError` (one line, no usage dump, no SystemExit)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def add_runtime_flags(p: argparse.ArgumentParser, engines: tuple[str, ...] | None = None, engine_help: str | None = None) -> None:
    """--engine, --precision, --cache-dir, --[no-]cache, --[no-]progress from their declarations;
    ``engines``/``engine_help`` for commands whose engine choice is wider (predict)."""
    add_setting_flags(p, RUNTIME_FIELDS, cli_defaults=CLI_RUNTIME_DEFAULTS, skip=("engine",) if engines else ())
    if engines:
        p.add_argument("--engine", default=None, choices=list(engines), help=f"{engine_help} (default: auto)")


def runtime_options(args) -> dict:
    """Runtime options given on the command line, over the CLI's defaults."""
    return given(args, RUNTIME_FIELDS, CLI_RUNTIME_DEFAULTS)


def printable(text: str) -> str:
    """``text`` safe to print on a UTF-8 stdout: a file name that is not UTF-8 reaches Python
    with surrogate escapes (``os.fsdecode``), which a strict stream refuses; its bytes are
    shown as ``\\xNN`` instead, so one odd name never costs the user the whole report."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name produced
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def one_line(e: BaseException) -> str:
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0]


def bounded(cast, what: str, ok, rule: str):
    """argparse type: ``cast`` the text, then require ``ok(value)``; one-line errors."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v

    return parse


positive_float = bounded(float, "a number", lambda v: v > 0, "> 0")
non_negative_float = bounded(float, "a number", lambda v: v >= 0, ">= 0")
positive_int = bounded(int, "an integer", lambda v: v >= 1, ">= 1")
port = bounded(int, "a port number", lambda v: 0 <= v <= 65535, "0..65535 (0 = any free port)")
