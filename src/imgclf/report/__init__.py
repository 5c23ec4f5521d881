"""The self-contained report.html of a run folder."""
