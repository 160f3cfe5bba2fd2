"""Worker: one training configuration (workload, backend, method) in this process."""

import time

import measure
import methods
import workloads


def _compile(model, workload, jit_compile, optimizer=None):
    import keras

    kwargs = {"weighted_metrics": []} if workloads.is_causal_lm(workload) else {"metrics": []}
    model.compile(
        optimizer=optimizer or keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
        **kwargs,
    )


def _count_train_step_calls(model):
    """Wrap `model.train_step` so each Python execution of it is counted.

    Under `jit_compile`, and in TensorFlow graph mode, the Python body runs
    only while the step is traced, so the count is the number of traces.
    Eager torch runs it once per step.
    """
    calls = {"count": 0}
    train_step = model.train_step

    def counted_train_step(*args, **kwargs):
        calls["count"] += 1
        return train_step(*args, **kwargs)

    model.train_step = counted_train_step
    return calls


def _repeat_batch(x, y, sample_weight, times):
    import numpy as np

    x = {name: np.concatenate([value] * times) for name, value in x.items()}
    return x, np.concatenate([y] * times), np.concatenate([sample_weight] * times)


def _build_optimizer_first(config, method):
    """Return whether this configuration builds its optimizer right after compile.

    Keras' TensorFlow trainer otherwise creates the optimizer's variables
    inside the first trace of the step, and tf.function traces it again.
    keras_peft builds the training state itself before that trace, so its
    methods are left to it. The baselines make the equivalent public call
    unless `--baseline-optimizer lazy` requested Keras' default.
    """
    if isinstance(method, methods.PeftMethod):
        return False
    return config.get("baseline_optimizer") == "built"


def run(config):
    import keras
    import numpy as np

    workload = config["workload"]
    method = methods.METHODS_BY_NAME[config["method"]]
    batch_size = config["batch_size"]
    result = {"batch_size": batch_size}

    start = time.perf_counter()
    model = workloads.build(workload)
    x, y, data = workloads.training_batch(workload, batch_size)
    # Passing sample weights to fit and to train_on_batch gives both the same
    # input structure, so JAX does not trace the step a second time.
    sample_weight = np.ones(y.shape, "float32")
    result["data"] = data
    method.apply(model)
    result["trainable_parameters"] = methods.count_parameters(model.trainable_weights)
    result["total_parameters"] = methods.count_parameters(model.weights)
    calls = _count_train_step_calls(model)
    _compile(model, workload, config["jit_compile"])
    result["optimizer_built_after_compile"] = _build_optimizer_first(config, method)
    if result["optimizer_built_after_compile"]:
        model.optimizer.build(model.trainable_variables)
    result["jit_compile"] = model.jit_compile
    result["build_seconds"] = time.perf_counter() - start
    result["rss_before_training_mb"] = measure.current_rss_mb()

    # A short fit first: it compiles the step and shows how often it is traced.
    fit_steps = config["fit_steps"]
    fit_x, fit_y, fit_weight = _repeat_batch(x, y, sample_weight, fit_steps)
    start = time.perf_counter()
    model.fit(fit_x, fit_y, sample_weight=fit_weight, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    result["fit_seconds"] = time.perf_counter() - start
    result["fit_steps"] = fit_steps
    result["train_step_calls_in_fit"] = calls["count"]
    # The first fit compiles the step, so this peak includes the compiler's memory.
    result["peak_rss_after_fit_mb"] = measure.peak_rss_mb()

    # train_on_batch returns the loss as NumPy, so each call is synchronous.
    for _ in range(config["warmup_steps"]):
        model.train_on_batch(x, y, sample_weight=sample_weight)
    result["step_seconds"], result["step_cpu_seconds"] = measure.time_calls(
        lambda: model.train_on_batch(x, y, sample_weight=sample_weight), config["steps"]
    )
    result["train_step_calls_total"] = calls["count"]
    result["peak_rss_mb"] = measure.peak_rss_mb()
    # The memory training keeps once compiled: parameters, optimizer state, buffers.
    result["rss_after_steps_mb"] = measure.current_rss_mb()
    result["backend"] = keras.backend.backend()
    return result
