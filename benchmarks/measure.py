"""Clock and memory helpers shared by the benchmark workers."""

import resource
import statistics
import sys
import time


def peak_rss_mb():
    """Return the peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb():
    """Return the resident memory of this process now, in MiB (`psutil`, else /proc)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as file:
            pages = int(file.read().split()[1])
        return pages * resource.getpagesize() / (1024 * 1024)
    return psutil.Process().memory_info().rss / (1024 * 1024)


def time_calls(function, count):
    """Call `function()` `count` times; return `(wall, cpu)`, each a list of seconds per call.

    `cpu` is the CPU time of the whole process (every thread) during the
    call. With one thread per backend it is the work done, and unlike the
    wall time it hardly grows when other jobs share the cores. `function`
    must return only once its work is finished (the callers synchronise
    asynchronous backends themselves).
    """
    wall, cpu = [], []
    for _ in range(count):
        wall_start = time.perf_counter()
        cpu_start = time.process_time()
        function()
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    return wall, cpu


def median(values):
    return statistics.median(values) if values else None
