"""Settings declared once (type, default, range, help) and the recipes that override them; no torch."""
