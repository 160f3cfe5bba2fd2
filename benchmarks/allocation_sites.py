"""Native memory that two training configurations keep, compared by allocation site.

`record` trains one configuration as `memory_probe.py` does and tracks the
training with memray, native stacks included. `compare` reads two captures
and keeps the allocations still alive when training ended. It groups their
bytes by the first stack frame outside the allocators and the standard
library, then prints the sites where the second configuration keeps the
most memory beyond the first.

memray runs on Linux and macOS; it is part of the `benchmarks` extra there.

    KERAS_BACKEND=tensorflow python benchmarks/allocation_sites.py record base limit \\
        --batch 4 --fit-steps 2 --steps 4 --build-optimizer --output /tmp/limit.bin
    KERAS_BACKEND=tensorflow python benchmarks/allocation_sites.py record base lora \\
        --batch 4 --fit-steps 2 --steps 4 --build-optimizer --output /tmp/lora.bin
    python benchmarks/allocation_sites.py compare /tmp/limit.bin /tmp/lora.bin

The model is built, adapted and compiled before tracking starts, so the
recording contains what training adds: traced graphs, compiled kernels,
optimizer updates and the tensors still alive after the last step.
"""

import argparse
import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cli  # noqa: E402
import measure  # noqa: E402
import memory_probe  # noqa: E402

# Frames of the allocator and of generic containers do not show which code
# requested the memory, so a site is the first frame outside them.
GENERIC_FRAMES = (
    "malloc",
    "calloc",
    "realloc",
    "memalign",
    "operator new",
    "std::",
    "__gnu_cxx::",
    "absl::",
    "google::protobuf::internal::",
    "google::protobuf::Arena",
)


def _import_memray(parser):
    try:
        import memray
    except ImportError:
        parser.error("allocation_sites.py needs memray. Install it with `pip install memray` (Linux and macOS).")
    return memray


def allocation_site(stack):
    """Return the first frame name of `stack` that is not an allocator or container frame."""
    for name, _file, _line in stack:
        if not any(part in name for part in GENERIC_FRAMES):
            return name
    return "(allocator only)"


def live_bytes_by_site(path, memray):
    """Return `(total, bytes_by_site, count_by_site)` for the allocations alive at the end of `path`."""
    reader = memray.FileReader(path)
    sizes = collections.Counter()
    counts = collections.Counter()
    for record in reader.get_leaked_allocation_records(merge_threads=True):
        site = allocation_site(record.hybrid_stack_trace())
        sizes[site] += record.size
        counts[site] += record.n_allocations
    return sum(sizes.values()), sizes, counts


def record(args, memray):
    if os.path.exists(args.output):
        raise SystemExit(f"Output file {args.output} already exists. Remove it or pass another --output.")
    model, data = memory_probe.prepare(args)
    with memray.Tracker(args.output, native_traces=True):
        memory_probe.train(model, data, args)
    print(f"recorded {args.workload} {args.method} batch={args.batch} to {args.output}; "
          f"peak RSS {measure.peak_rss_mb():.0f} MiB")


def compare(args, memray):
    first_total, first, first_counts = live_bytes_by_site(args.first, memray)
    second_total, second, second_counts = live_bytes_by_site(args.second, memray)
    mib = 1024 * 1024
    print(f"alive after training: {first_total / mib:.1f} MiB in {args.first}, "
          f"{second_total / mib:.1f} MiB in {args.second}")
    print(f"{'difference':>12} {'first':>9} {'second':>9} {'allocations':>19}  site")
    sites = sorted(set(first) | set(second), key=lambda site: second[site] - first[site], reverse=True)
    for site in sites[: args.top]:
        print(f"{(second[site] - first[site]) / mib:+10.2f} MiB {first[site] / mib:9.2f} {second[site] / mib:9.2f} "
              f"{first_counts[site]:9d} {second_counts[site]:9d}  {site[:120]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    record_parser = commands.add_parser("record", help="train one configuration under memray")
    memory_probe.add_arguments(record_parser)
    record_parser.add_argument("--output", required=True, help="memray capture file to write")
    compare_parser = commands.add_parser("compare", help="compare two captures by allocation site")
    compare_parser.add_argument("first", help="capture of the reference configuration")
    compare_parser.add_argument("second", help="capture of the configuration to explain")
    compare_parser.add_argument("--top", type=cli.int_at_least(1), default=25, help="number of sites to print")
    args = parser.parse_args(argv)

    if args.command == "compare":
        for path in (args.first, args.second):
            if not os.path.isfile(path):
                parser.error(f"capture file not found: {path!r}. Write it with the `record` command first.")
    memray = _import_memray(parser)
    if args.command == "record":
        record(args, memray)
    else:
        compare(args, memray)


if __name__ == "__main__":
    main()
