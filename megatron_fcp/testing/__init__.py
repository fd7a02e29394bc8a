"""Tools for checking and measuring the training path (not imported by it): the in-process executor of every rank,
the float64 reference attention and brute-force plan checker, the batch/rank layout helpers and the ring-stepped
baseline."""
