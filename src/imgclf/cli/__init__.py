"""Command line: one module per command group; imports stay light so --help is fast."""
