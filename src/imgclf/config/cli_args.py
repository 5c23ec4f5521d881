"""Command-line flags generated from the declarations in :mod:`imgclf.config.settings`.

Every flag's type, choices, bounds and help come from its field; its argparse default
is None ("not given"), so the recipe's value applies and the run records what was
given. Values are checked as they are parsed: a bad one is refused before any work.
"""

from __future__ import annotations

import argparse
import dataclasses

from imgclf.config.recipes import RECIPES, recipe_default
from imgclf.config.settings import FIELD_TYPES, SettingError, base_type, check_value, coerce

_GROUP_TITLES = {
    "model": "model",
    "training": "training, stage 1: the head on cached frozen features (defaults: the recipe's)",
    "fine-tuning": "training, stage 2: the last blocks on cached frozen-prefix activations (any of these flags switches stage 2 on)",
    "augmentation": "augmentation (training)",
    "decision": "decision and evaluation",
    "similar cases": "similar cases (the training images nearest to a prediction)",
    "data": "data",
    "output": "output",
    "runtime": "backbone runtime",
}


def flag(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _parse_value(f: dataclasses.Field):
    """argparse ``type``: cast the text, then the field's own checks, as a one-line error."""
    cast = base_type(FIELD_TYPES[f.name])

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if cast is int else 'a number'}: {text!r}") from None
        try:
            check_value(f, coerce(value, f))
        except SettingError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


def _default_text(f: dataclasses.Field, show_recipes: bool, default) -> str:
    def fmt(v):
        return "unset" if v is None else f"{v:g}" if isinstance(v, float) else "on" if v is True else "off" if v is False else str(v)

    base = fmt(default)
    if show_recipes:
        differ = {r: recipe_default(f.name, r) for r in RECIPES}
        if len({fmt(v) for v in differ.values()}) > 1:
            return "default: " + ", ".join(f"{r} {fmt(v)}" for r, v in differ.items())
    return f"default: {base}"


def add_setting_flags(parser: argparse.ArgumentParser, fields, *, show_recipes: bool = False, cli_defaults: dict | None = None,
                      skip: tuple[str, ...] = ()) -> None:
    """One flag per declared field (``fields``: name → dataclasses.Field), in its group.

    ``cli_defaults`` changes what the flag means when absent for the command line only
    (e.g. progress bars on); ``skip`` leaves fields to the caller.
    """
    groups: dict[str, argparse._ArgumentGroup] = parser.__dict__.setdefault("_imgclf_groups", {})  # one group per title across calls
    cli_defaults = cli_defaults or {}
    for name, f in fields.items():
        meta = f.metadata
        if not meta.get("cli", True) or name in skip:
            continue
        title = meta.get("group", "training")
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(_GROUP_TITLES.get(title, title)))
        kind = base_type(FIELD_TYPES[name])
        default = cli_defaults.get(name, f.default)
        says_default = "unset:" in meta["help"] or "default:" in meta["help"]
        text = meta["help"] if says_default else meta["help"] + f" ({_default_text(f, show_recipes, default)})"
        text = text.replace("%", "%%")
        if kind is bool:
            group.add_argument(flag(f), dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif meta.get("choices"):
            group.add_argument(flag(f), dest=name, default=None, choices=list(meta["choices"]), help=text)
        elif kind in (int, float):
            group.add_argument(flag(f), dest=name, default=None, type=_parse_value(f), metavar=name.upper(), help=text)
        else:
            group.add_argument(flag(f), dest=name, default=None, type=_parse_value(f) if meta.get("check") else None, metavar=name.upper(), help=text)


def given(args: argparse.Namespace, fields, cli_defaults: dict | None = None) -> dict:
    """The declared settings given on the command line (plus command-line defaults)."""
    out = {k: v for k, v in (cli_defaults or {}).items() if k in fields}
    out.update({k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})
    return out
