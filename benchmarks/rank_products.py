"""Time saved by LoRA's low-rank path over Keras' `enable_lora` in one projection's backward pass.

Keras' `enable_lora` adds A·B to the kernel, so its backward pass computes
the full kernel gradient xᵀ·dy (T × d by T × k for T tokens). keras_peft
never forms that gradient: it runs six rank-r products instead (x·A and
low·B forward; dy·Bᵀ, lowᵀ·dy, xᵀ·d_low and d_low·Aᵀ backward). This script
times both with JAX on the CPU, one thread, and prints the time and the
rate of each, so the saving per projection can be compared with a step.

    python benchmarks/rank_products.py --tokens 1024 --width 256   # the `small` shape, batch 8
    python benchmarks/rank_products.py --tokens 512 --width 768    # the `base` shape, batch 4

It needs JAX, and sets XLA to one thread before JAX starts.
"""

import argparse
import os

import cli
import measure


def median_seconds(function, arguments, calls):
    """Return the median wall time of `calls` calls of the compiled JAX `function`, after one warm-up call."""
    function(*arguments).block_until_ready()
    wall, _ = measure.time_calls(lambda: function(*arguments).block_until_ready(), calls)
    return measure.median(wall)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=cli.int_at_least(1), required=True,
                        help="tokens in the batch (batch size × sequence length)")
    parser.add_argument("--width", type=cli.int_at_least(1), required=True,
                        help="input and output size of the projection")
    parser.add_argument("--rank", type=cli.int_at_least(1), default=8, help="LoRA rank (default 8)")
    parser.add_argument("--calls", type=cli.int_at_least(1), default=200,
                        help="timed calls per computation (default 200)")
    args = parser.parse_args(argv)

    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    tokens, width, rank = args.tokens, args.width, args.rank

    def normal(*shape):
        return jax.numpy.asarray(rng.normal(size=shape), "float32")

    x, dy = normal(tokens, width), normal(tokens, width)
    a, b = normal(width, rank), normal(rank, width)
    low = x @ a

    def kernel_gradient(x, dy):
        return x.T @ dy

    def rank_path(x, dy, a, b, low):
        d_low = dy @ b.T
        # Summing each product keeps all six in the compiled function.
        return (x @ a).sum() + (low @ b).sum() + (low.T @ dy).sum() + (x.T @ d_low).sum() + (d_low @ a.T).sum()

    full = median_seconds(jax.jit(kernel_gradient), (x, dy), args.calls)
    path = median_seconds(jax.jit(rank_path), (x, dy, a, b, low), args.calls)
    full_flops = 2 * tokens * width * width
    path_flops = 2 * tokens * rank * width * 6
    print(f"tokens={tokens} width={width} rank={rank}, JAX {jax.__version__} on {jax.devices()[0].platform}, one thread")
    rows = [
        ("kernel gradient xᵀ·dy", full, f", {full_flops / full / 1e9:6.1f} GFLOP/s"),
        (f"six rank-{rank} products", path, f", {path_flops / path / 1e9:6.1f} GFLOP/s"),
        ("difference", full - path, ""),
    ]
    for label, seconds, rate in rows:
        print(f"  {label + ':':26} {seconds * 1e6:8.0f} µs{rate}")


if __name__ == "__main__":
    main()
