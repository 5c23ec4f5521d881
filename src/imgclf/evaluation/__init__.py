"""Numbers about predictions: decision thresholds, metrics with confidence intervals, plots."""
