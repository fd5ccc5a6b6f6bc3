"""Tools that drive or measure a line: the demo, replay, the event follower, the end-to-end and
soak benchmarks, and the harness they share.

They import the line's modules (``lineguard.stream``), never the other way round: a worker on
the line runs without any of them (``tests/test_layers.py`` checks it).
"""
