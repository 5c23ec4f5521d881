"""``imgclf audit``: likely mislabelled images, outliers and duplicates, found before training."""
