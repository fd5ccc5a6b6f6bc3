"""Measurements of the model package: model throughput (``lineguard bench model``), patch-bank
search (``lineguard bench knn``) and the machine they ran on.

Benchmarks import the production modules, never the other way round: nothing under
``lineguard.engines`` outside this package imports it (``tests/test_layers.py``).
"""
