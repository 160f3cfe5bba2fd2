"""Worker: forward and `generate` speed of a causal LM with and without adapters.

All variants live in this one process (memory is not measured here) and
their calls alternate, so that the ratios compare calls made side by side.
"""

import time

import measure
import methods
import workloads


def _set_nonzero(variable, seed, scale=0.01):
    import numpy as np

    rng = np.random.default_rng(seed)
    variable.assign((scale * rng.standard_normal(tuple(variable.shape))).astype("float32"))


def _lora_model(workload, merged):
    import keras_peft

    model = workloads.build(workload)
    keras_peft.apply(model, methods.METHODS_BY_NAME["lora"].make())
    # B starts at zero; give it values so that the merged kernel really changes.
    for seed, variable in enumerate(v for v in model.weights if v.name == "lora_kernel_b"):
        _set_nonzero(variable, seed)
    if merged:
        keras_peft.merge(model)
    return model


def build_variants(workload, method_names):
    """Return `{variant name: model}`: the base model, LoRA unmerged and merged, other methods."""
    variants = {"base": workloads.build(workload)}
    variants["lora"] = _lora_model(workload, merged=False)
    variants["lora_merged"] = _lora_model(workload, merged=True)
    for name in method_names:
        method = methods.METHODS_BY_NAME[name]
        if name == "lora" or not method.changes_forward or not method.available():
            continue
        model = workloads.build(workload)
        method.apply(model)
        variants[name] = model
    return variants


def make_forward(model, jit_compile):
    """Return a function that runs the model's forward pass once and waits for it."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        @jax.jit
        def forward(trainable, non_trainable, x):
            return model.stateless_call(trainable, non_trainable, x, training=False)[0]

        def run(x):
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            forward(trainable, non_trainable, x).block_until_ready()

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        forward = tf.function(lambda x: model(x, training=False), jit_compile=bool(jit_compile))

        def run(x):
            # Reading one element waits for the whole result.
            forward(x)[0, 0, 0].numpy()

        return run
    import torch

    def run(x):
        with torch.no_grad():
            model(x, training=False)

    return run


def run(config):
    import keras

    workload = config["workload"]
    batch_size = config["batch_size"]
    rounds = config["rounds"]
    result = {"batch_size": batch_size, "backend": keras.backend.backend()}

    start = time.perf_counter()
    variants = build_variants(workload, config["methods"])
    for model in variants.values():
        model.compile(sampler="greedy", weighted_metrics=[], jit_compile=config["jit_compile"])
    jit_compile = {name: model.jit_compile for name, model in variants.items()}
    result["jit_compile"] = jit_compile["base"]
    result["build_seconds"] = time.perf_counter() - start

    x, _ = workloads.gpt2_training_batch(workload, batch_size)
    if result["backend"] == "torch":
        x = {name: keras.ops.convert_to_tensor(value) for name, value in x.items()}
    forwards = {name: make_forward(model, jit_compile[name]) for name, model in variants.items()}
    for forward in forwards.values():
        for _ in range(config["warmup_steps"]):
            forward(x)
    # {variant: [[seconds of each call] for each round]}, wall and CPU time.
    forward_seconds = {name: [] for name in variants}
    forward_cpu_seconds = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = measure.time_calls(lambda: forwards[name](x), config["forward_calls"])
            forward_seconds[name].append(wall)
            forward_cpu_seconds[name].append(cpu)
    result["forward_seconds"] = forward_seconds
    result["forward_cpu_seconds"] = forward_cpu_seconds

    # generate(): the base model and the variants whose forward pass differs.
    prompts = workloads.gpt2_prompts(workload, batch_size)
    new_tokens = batch_size * (workloads.GENERATE_LENGTH - workloads.PROMPT_LENGTH)
    generate_names = [name for name in names if name != "lora_merged"]
    if not config["generate_calls"]:
        generate_names = []
    for name in generate_names:
        variants[name].generate(prompts, stop_token_ids=None)
    generate_seconds = {name: [] for name in generate_names}
    generate_cpu_seconds = {name: [] for name in generate_names}
    for round_index in range(rounds):
        shift = round_index % max(1, len(generate_names))
        for name in generate_names[shift:] + generate_names[:shift]:
            model = variants[name]
            wall, cpu = measure.time_calls(lambda: model.generate(prompts, stop_token_ids=None), config["generate_calls"])
            generate_seconds[name].append(wall)
            generate_cpu_seconds[name].append(cpu)
    result["generate_seconds"] = generate_seconds
    result["generate_cpu_seconds"] = generate_cpu_seconds
    result["generated_tokens_per_call"] = new_tokens
    result["peak_rss_mb"] = measure.peak_rss_mb()
    return result
