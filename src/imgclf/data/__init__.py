"""Images and datasets: decoding, preprocessing, augmentation, folder layouts and splits, inspection, demo data."""
