"""Command line: ``imgclf COMMAND ...``; each command group lives in its own module.

Errors in the user's input (a bad flag included) end in one line on stderr and exit
code 2; anything unexpected ends in one line and exit code 1 (``IMGCLF_DEBUG=1`` shows
the traceback). Command modules import heavy libraries only inside their commands, so
``imgclf --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

from imgclf import distributed
from imgclf._version import __version__
from imgclf.cli.common import Parser, one_line

# Each module has ``register(subparsers, commands)``: it adds its parsers and puts
# ``name -> function(args) -> int`` into ``commands``.
COMMAND_MODULES = ("imgclf.cli.train", "imgclf.cli.predict", "imgclf.cli.inspect", "imgclf.cli.audit", "imgclf.cli.explain", "imgclf.cli.report",
                   "imgclf.cli.export", "imgclf.cli.serve", "imgclf.cli.extract")


def build_parser(commands: dict | None = None) -> Parser:
    parser = Parser(prog="imgclf", description="Folder of labelled images → transfer-learned, evaluated, saved image classifier.")
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and results only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {} if commands is None else commands
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub, commands)
    return parser


def _parse(parser: Parser, argv: list[str] | None):
    """parse_args, except that a command with an optional list of paths (``extra_positionals``)
    also gets the paths argparse leaves over: those after an option or after ``--``."""
    args, extra = parser.parse_known_args(argv)
    dest = getattr(args, "extra_positionals", None)
    if extra and dest:
        cut = extra.index("--") if "--" in extra else len(extra)
        before, after = extra[:cut], extra[cut + 1:]
        getattr(args, dest).extend([e for e in before if not e.startswith("-")] + after)
        extra = [e for e in before if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    commands: dict = {}
    parser = build_parser(commands)
    try:
        args = _parse(parser, argv)
        if not args.command:
            parser.print_help()
            return 2
        from imgclf.runs.folders import setup_logging

        setup_logging(verbose=args.verbose, quiet=args.quiet)
        if distributed.detect() is not None:  # launched by torchrun: join its process group
            _join_torchrun(args)
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except distributed.DistributedError as e:  # a rank died, was stopped or timed out
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf: error: {one_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # user-facing errors: bad paths, bad flags, missing weights, bad bundles
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for users
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf: unexpected error: {type(e).__name__}: {one_line(e)} (set IMGCLF_DEBUG=1 for details)", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()


def _join_torchrun(args) -> None:
    """Join the torchrun job (every command then shards its images across the ranks); ranks
    other than 0 log errors only, since rank 0 reports for the job."""
    import logging

    device = str(getattr(args, "device", None) or "cpu")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = distributed.setup(device_type=device)
    if ctx is not None and not ctx.is_main:
        logging.getLogger("imgclf").setLevel(logging.ERROR)
