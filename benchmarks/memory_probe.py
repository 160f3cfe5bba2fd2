"""Resident memory after a few training steps of one configuration, in this process.

Used to tell held activations from fixed costs: run it for two batch sizes
and compare how the difference between two configurations changes.

    KERAS_BACKEND=tensorflow python benchmarks/memory_probe.py small lora --batch 8
    KERAS_BACKEND=tensorflow python benchmarks/memory_probe.py base lora --batch 4 \\
        --fit-steps 2 --build-optimizer

Besides the training configurations of `methods.py`, three probe-only
configurations separate the parts of LoRA's cost:

- `limit_every_block`: the limit, with the query and value biases of every
  block trainable instead of the first block's only.
- `lora_query`: keras_peft LoRA of rank 8 on the query projections only.
- `lora_zero_update`: keras_peft LoRA on query and value whose layers add
  0 × (sum of A + sum of B) to the base output, so the same variables train
  but no low-rank product is computed.

`--breakdown` also prints glibc's heap in use, which is mostly native
bookkeeping such as graphs and kernels, and the memory of Python objects.
With `TF_CPU_ALLOCATOR_USE_BFC=true` on TensorFlow it adds the current and
peak memory of TensorFlow's tensors.
`allocation_sites.py` lists the native allocation sites themselves.

Run each configuration in a fresh process: peak memory never goes down.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cli  # noqa: E402
import measure  # noqa: E402
import methods  # noqa: E402
import training  # noqa: E402
import workloads  # noqa: E402

PROBE_ONLY = ("limit_every_block", "lora_query", "lora_zero_update")


def _zero_update_call(self, inputs, training=None):
    from keras import ops

    unused = ops.sum(self.lora_kernel_a) + ops.sum(self.lora_kernel_b)
    return self.base_layer(inputs) + 0.0 * unused


def apply_probe(model, name):
    """Apply a training configuration of `methods.py` or one of `PROBE_ONLY`."""
    import keras_peft

    if name == "limit_every_block":
        methods.apply_limit(model)
        for block in model.backbone.transformer_layers:
            attention = block._self_attention_layer
            attention._query_dense.bias.trainable = True
            attention._value_dense.bias.trainable = True
    elif name == "lora_query":
        keras_peft.apply(model, keras_peft.LoRA(rank=8, targets=["query"]))
    elif name == "lora_zero_update":
        from keras_peft.layers.lora_dense import LoRADense

        # Only this process measures, so replacing the class's call is safe here.
        LoRADense.call = _zero_update_call
        keras_peft.apply(model, keras_peft.LoRA(rank=8, targets=["query", "value"]))
    else:
        methods.METHODS_BY_NAME[name].apply(model)


def add_arguments(parser):
    """Add the arguments that choose and train one configuration."""
    parser.add_argument("workload", choices=workloads.WORKLOADS)
    parser.add_argument("method", choices=sorted(methods.METHODS_BY_NAME) + list(PROBE_ONLY))
    parser.add_argument("--batch", type=cli.int_at_least(1), required=True, help="batch size")
    parser.add_argument("--steps", type=cli.int_at_least(0), default=3, help="train_on_batch steps before measuring")
    parser.add_argument("--fit-steps", type=cli.int_at_least(0), default=0,
                        help="run a fit of this many steps first, as the benchmark's training worker does")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="AdamW(1e-4) as in the benchmark, or plain SGD(1e-4) without optimizer state")
    parser.add_argument("--jit-compile", action="store_true", help="compile with jit_compile=True")
    parser.add_argument("--build-optimizer", action="store_true",
                        help="build the optimizer after compile instead of in the first trace")


def prepare(args):
    """Build, adapt and compile the model; return it and one batch `(x, y, sample_weight)`."""
    import keras
    import numpy as np

    model = workloads.build(args.workload)
    x, y, _ = workloads.training_batch(args.workload, args.batch)
    apply_probe(model, args.method)
    # Plain SGD keeps no state, which separates the optimizer's share of the memory.
    optimizer = keras.optimizers.SGD(1e-4) if args.optimizer == "sgd" else None
    training._compile(model, args.workload, args.jit_compile, optimizer=optimizer)
    if args.build_optimizer:
        model.optimizer.build(model.trainable_variables)
    return model, (x, y, np.ones(y.shape, "float32"))


def train(model, data, args):
    """Run the `--fit-steps` fit, then `--steps` calls of `train_on_batch`."""
    x, y, sample_weight = data
    if args.fit_steps:
        fit_x, fit_y, fit_weight = training._repeat_batch(x, y, sample_weight, args.fit_steps)
        model.fit(fit_x, fit_y, sample_weight=fit_weight, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
    for _ in range(args.steps):
        model.train_on_batch(x, y, sample_weight=sample_weight)


def heap_in_use_mb():
    """Return the memory allocated through glibc's malloc and not yet freed, in MiB, or None.

    Blocks above malloc's mmap threshold, which include large tensors, are
    not counted, so the figure mostly shows native bookkeeping such as
    graphs and kernels. Returns None without glibc 2.33 or later.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    library = ctypes.CDLL(name)
    if not hasattr(library, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(field, ctypes.c_size_t) for field in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    library.mallinfo2.restype = MallInfo2
    return library.mallinfo2().uordblks / (1024 * 1024)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--phases", action="store_true",
                        help="TensorFlow only: trace tf.function(model.train_step) directly, with an unknown "
                             "batch size as in fit, and report the graph's op count and the RSS after tracing, "
                             "after the first step and after --steps")
    parser.add_argument("--breakdown", action="store_true",
                        help="also report glibc's heap in use, the memory of Python objects (tracemalloc, "
                             "which makes the run slower) and, with TF_CPU_ALLOCATOR_USE_BFC=true, TensorFlow's "
                             "tensors")
    args = parser.parse_args(argv)

    import tracemalloc

    import keras

    if args.phases and keras.backend.backend() != "tensorflow":
        parser.error(f"--phases needs the TensorFlow backend, but Keras uses {keras.backend.backend()!r}. "
                     "Set KERAS_BACKEND=tensorflow.")

    if args.breakdown:
        tracemalloc.start()
    model, data = prepare(args)
    if args.phases:
        _report_phases(model, data, args)
        return
    train(model, data, args)
    print(
        f"{keras.backend.backend()} {args.workload} {args.method} batch={args.batch} "
        f"fit_steps={args.fit_steps} optimizer={args.optimizer} "
        f"jit_compile={args.jit_compile} build_optimizer={args.build_optimizer}: "
        f"RSS after {args.steps} steps {measure.current_rss_mb():.0f} MiB, "
        f"peak {measure.peak_rss_mb():.0f} MiB"
    )
    if args.breakdown:
        heap = heap_in_use_mb()
        heap_text = "unknown (needs glibc)" if heap is None else f"{heap:.0f} MiB"
        python_objects = tracemalloc.get_traced_memory()[0] / (1024 * 1024)
        print(f"heap in use {heap_text}, Python objects {python_objects:.0f} MiB")
        tensors = tensorflow_tensor_memory_mb()
        if tensors is not None:
            print(f"TensorFlow tensors: {tensors[0]:.0f} MiB now, peak {tensors[1]:.0f} MiB")


def tensorflow_tensor_memory_mb():
    """Return `(current, peak)` MiB of TensorFlow's CPU tensors, or None where TensorFlow cannot tell.

    TensorFlow counts them only with its BFC allocator on the CPU, which
    `TF_CPU_ALLOCATOR_USE_BFC=true` selects before TensorFlow starts.
    """
    import keras

    if keras.backend.backend() != "tensorflow" or os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") != "true":
        return None
    import tensorflow as tf

    info = tf.config.experimental.get_memory_info("CPU:0")
    return info["current"] / (1024 * 1024), info["peak"] / (1024 * 1024)


def _report_phases(model, data, args):
    """Print the RSS after tracing the train step, after its first run and after `args.steps` runs."""
    import tensorflow as tf

    data = tf.nest.map_structure(tf.convert_to_tensor, data)
    # fit feeds batches whose first dimension is unknown, so trace the step the same way.
    specs = tf.nest.map_structure(lambda tensor: tf.TensorSpec((None,) + tuple(tensor.shape[1:]), tensor.dtype), data)
    model.optimizer.build(model.trainable_variables)
    before = measure.current_rss_mb()
    step = tf.function(model.train_step)
    graph = step.get_concrete_function(specs).graph
    traced = measure.current_rss_mb()
    step(data)
    first = measure.current_rss_mb()
    for _ in range(args.steps - 1):
        step(data)
    print(
        f"tensorflow {args.workload} {args.method} batch={args.batch} optimizer={args.optimizer}: "
        f"{len(graph.get_operations())} ops in the step's graph; RSS before tracing {before:.0f} MiB, "
        f"traced {traced:.0f} MiB, after the first step {first:.0f} MiB, "
        f"after {args.steps} steps {measure.current_rss_mb():.0f} MiB"
    )


if __name__ == "__main__":
    main()
