"""Resident memory after a few training steps of one configuration, in this process.

Used to tell held activations from fixed costs: run it for two batch sizes
and compare how the difference between two methods changes.

    KERAS_BACKEND=tensorflow python benchmarks/memory_probe.py small lora --batch 8
    KERAS_BACKEND=tensorflow python benchmarks/memory_probe.py base lora --batch 4 \\
        --jit-compile --build-optimizer

Run each configuration in a fresh process: peak memory never goes down.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import measure  # noqa: E402
import methods  # noqa: E402
import training  # noqa: E402
import workloads  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=workloads.WORKLOADS)
    parser.add_argument("method", choices=sorted(methods.METHODS_BY_NAME))
    parser.add_argument("--batch", type=int, required=True, help="batch size")
    parser.add_argument("--steps", type=int, default=3, help="train_on_batch steps before measuring")
    parser.add_argument("--jit-compile", action="store_true", help="compile with jit_compile=True")
    parser.add_argument("--build-optimizer", action="store_true",
                        help="build the optimizer after compile instead of in the first trace")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    model = workloads.build(args.workload)
    x, y, _ = workloads.training_batch(args.workload, args.batch)
    methods.METHODS_BY_NAME[args.method].apply(model)
    training._compile(model, args.workload, args.jit_compile)
    if args.build_optimizer:
        model.optimizer.build(model.trainable_variables)
    sample_weight = np.ones(y.shape, "float32")
    for _ in range(args.steps):
        model.train_on_batch(x, y, sample_weight=sample_weight)
    print(
        f"{keras.backend.backend()} {args.workload} {args.method} batch={args.batch} "
        f"jit_compile={args.jit_compile} build_optimizer={args.build_optimizer}: "
        f"RSS after {args.steps} steps {measure.current_rss_mb():.0f} MiB, "
        f"peak {measure.peak_rss_mb():.0f} MiB"
    )


if __name__ == "__main__":
    main()
