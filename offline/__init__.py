"""Once per product, before the line goes live: data, pseudo-labels, training, calibration,
evaluation and synthetic product lines. Imports ``engines``; never imported by ``stream``."""
