"""Peak resident-set growth of a block of code, for the memory probes of the benchmarks.

On Linux, writing 5 to ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current RSS, so the peak after
the block minus the RSS before it is the block's own peak. Elsewhere we fall back to the growth of ``ru_maxrss``,
which is inherited across fork/exec (a probe started by a big parent then under-reports).
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextmanager
def peak_extra_mb() -> Iterator[list[float]]:
    """``with peak_extra_mb() as result: ...``; afterwards ``result[0]`` holds the block's peak extra RSS in MB."""
    result: list[float] = []
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, use_hwm = _status_kb("VmRSS"), True
    except OSError:
        before, use_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    yield result
    after = _status_kb("VmHWM") if use_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result.append((after - before) / 1024.0)
