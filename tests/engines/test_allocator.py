"""keep_freed_memory: freed large tensors are reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from lineguard.engines.allocator import keep_freed_memory
kept = {keep}
if kept:
    assert keep_freed_memory()
torch.empty(48 << 20, dtype=torch.uint8).fill_(1)  # first touch: always faults
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(keep=keep)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_tensors_are_reused_with_fewer_page_faults() -> None:
    # Ten 48 MiB tensors, above glibc's largest dynamic mmap threshold (32 MiB): by default each
    # is mapped and faulted in afresh. Measured here: 122 890 faults by default, 73 728 kept; in
    # LGST training the gap is 30× (12 M vs 0.36 M over 34 steps) because sizes vary there.
    assert _faults(keep=True) < 0.75 * _faults(keep=False)
