"""Sub-commands added by this module (see ``imgclf.cli.EXTENSION_MODULES``)."""


def register(subparsers, commands) -> None:
    """Add this module's sub-commands (none yet)."""
