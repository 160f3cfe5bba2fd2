"""Summaries, ratios, target checks and the Markdown report of a benchmark run."""

import importlib.metadata
import os
import platform
import statistics
import subprocess

import methods

BEGIN = "<!-- BEGIN GENERATED RESULTS: written by benchmarks/run.py, edits here are overwritten -->"
END = "<!-- END GENERATED RESULTS -->"
PACKAGES = ("keras", "keras-hub", "keras-peft", "tensorflow", "jax", "jaxlib", "torch", "numpy",
            "transformers", "peft", "psutil")


def machine_info():
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    # The same test as the driver's choice of batch size: an NVIDIA device file.
    info["nvidia_gpu"] = os.path.exists("/dev/nvidia0")
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return info


def versions():
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# ---------------------------------------------------------------- statistics


def summarize(values):
    """Return `(median, min, max)` of a list, or `None` when it is empty."""
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _ok(records, kind=None):
    return [r for r in records if r["result"].get("ok") and (kind is None or r["config"]["kind"] in kind)]


def training_runs(data):
    """Return `{(workload, variant, method): {round: result}}` of successful training runs."""
    runs = {}
    for record in _ok(data["records"], ("train", "hf_train")):
        config = record["config"]
        key = (config["workload"], config["variant"], config["method"])
        runs.setdefault(key, {})[record["round"]] = record["result"]
    return runs


def cpu_key(key, result):
    """Return the CPU-time field for `key` (`step_seconds` → `step_cpu_seconds`) when present."""
    cpu = key.replace("_seconds", "_cpu_seconds")
    return cpu if cpu in result else key


def step_summary(rounds, cpu=False):
    """Median over every timed step, and the min and max of the per-round medians."""
    key = "step_seconds"
    pooled, per_round = [], []
    for result in rounds.values():
        times = result[cpu_key(key, result) if cpu else key]
        pooled += times
        per_round.append(statistics.median(times))
    return statistics.median(pooled), min(per_round), max(per_round)


def round_ratios(numerator, denominator, value):
    """Per-round ratios `value(numerator) / value(denominator)` over the rounds both have."""
    shared = sorted(set(numerator) & set(denominator))
    return [value(numerator[r]) / value(denominator[r]) for r in shared]


def median_step(result):
    return statistics.median(result["step_seconds"])


def median_cpu_step(result):
    return statistics.median(result[cpu_key("step_seconds", result)])


def peak_memory(result):
    return result["peak_rss_mb"]


def steady_memory(result):
    """Return the resident memory after the timed steps, once the step is compiled."""
    return result["rss_after_steps_mb"]


# ---------------------------------------------------------------- formatting


def format_ms(seconds):
    value = seconds * 1000
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def format_summary(summary, scale=format_ms):
    if summary is None:
        return "–"
    middle, low, high = summary
    if low == high:
        return scale(middle)
    return f"{scale(middle)} ({scale(low)}–{scale(high)})"


def format_ratio(value):
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def variant_order(variant):
    order = ["jax", "tensorflow", "tensorflow+xla", "torch", "torch (HF PEFT)"]
    return order.index(variant) if variant in order else len(order)


def jit_label(result):
    value = result.get("jit_compile")
    return {True: "XLA", False: "no XLA (graph or eager)"}.get(value, str(value))


# ---------------------------------------------------------------- sections


def optimizer_setting(settings):
    """Describe when the optimizer was built. Older result files use `build_optimizer`."""
    baseline = settings.get("baseline_optimizer")
    if baseline in ("built", "lazy"):
        baselines = {
            "built": "call `model.optimizer.build(model.trainable_variables)` after `compile`.",
            "lazy": "keep Keras' default.",
        }[baseline]
        return ("keras_peft methods leave it to keras_peft, which builds the training state before the "
                "first trace on TensorFlow. The configurations without keras_peft " + baselines)
    if settings.get("build_optimizer"):
        return "built with `model.optimizer.build(model.trainable_variables)` after `compile`."
    return "built by Keras during the first `fit`."


def header_section(data):
    machine = data["machine"]
    settings = data["settings"]
    lines = [
        f"- Date (UTC): {data['started']}; total wall time {data['wall_seconds'] / 60:.1f} min.",
        f"- Command: `{data['command']}`",
        f"- Machine: {machine.get('cpus')} CPUs ({machine.get('cpu_model', 'unknown model')}), "
        f"{machine.get('memory_gib', '?')} GiB memory, {machine.get('platform')}, Python {machine.get('python')}."
        + {True: " NVIDIA GPU present.", False: " No GPU."}.get(machine.get("nvidia_gpu"), ""),
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in data['load_average_before'])}; "
        f"after: {', '.join(f'{x:.1f}' for x in data['load_average_after'])}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v) + ".",
        f"- Threads per backend: {settings['threads'] or 'backend default'}. Batch sizes: "
        + ", ".join(f"{k} {v}" for k, v in settings["batch_sizes"].items())
        + "; sequence length 128.",
        "- Optimizer: " + optimizer_setting(settings),
        "- Repetitions per training configuration:",
    ]
    for size, reps in settings["repetitions"].items():
        lines.append(
            f"  - {size}: {reps['rounds']} round(s), each a fit of {reps['fit_steps']} steps, "
            f"{reps['warmup_steps']} untimed and {reps['steps']} timed train_on_batch steps."
        )
    return "\n".join(lines)


def training_section(data, workload):
    runs = training_runs(data)
    method_order = list(data["settings"]["method_names"]) + ["hf_peft_lora"]

    def order(key):
        method = key[2]
        return variant_order(key[1]), method_order.index(method) if method in method_order else len(method_order)

    keys = sorted((k for k in runs if k[0] == workload), key=order)
    if not keys:
        return None
    rows = []
    for key in keys:
        _, variant, method = key
        rounds = runs[key]
        first = next(iter(rounds.values()))
        limit = runs.get((workload, variant, "limit"))
        full = runs.get((workload, variant, "full"))
        to_limit = summarize(round_ratios(rounds, limit, median_cpu_step)) if limit else None
        to_limit_wall = summarize(round_ratios(rounds, limit, median_step)) if limit else None
        to_full = summarize(round_ratios(rounds, full, median_cpu_step)) if full else None
        memory = summarize([r["peak_rss_mb"] for r in rounds.values()])
        before = summarize([r["rss_before_training_mb"] for r in rounds.values()])
        steady = summarize([r["rss_after_steps_mb"] for r in rounds.values() if "rss_after_steps_mb" in r])
        traces = first.get("train_step_calls_in_fit")
        rows.append([
            variant,
            method,
            f"{first['trainable_parameters']:,}",
            format_summary(step_summary(rounds, cpu=True)),
            format_summary(step_summary(rounds)),
            format_summary(to_limit, format_ratio),
            format_summary(to_limit_wall, format_ratio),
            format_summary(to_full, format_ratio),
            format_summary(memory, lambda x: f"{x:.0f}"),
            format_summary(before, lambda x: f"{x:.0f}"),
            format_summary(steady, lambda x: f"{x:.0f}"),
            "–" if traces is None else f"{traces} / {first.get('fit_steps')}",
            jit_label(first),
        ])
    header = ["backend", "method", "trainable params", "step CPU ms", "step wall ms", "÷ limit (CPU)",
              "÷ limit (wall)", "÷ full (CPU)", "peak RSS MiB", "RSS before training MiB",
              "RSS after steps MiB",
              "train_step runs in fit / steps", "compilation"]
    data_note = next(iter(runs[keys[0]].values())).get("data", "")
    return f"Data: {data_note}.\n\n" + table(header, rows)


def inference_runs(data, workload):
    return {
        r["config"]["variant"]: r["result"]
        for r in _ok(data["records"], ("infer",))
        if r["config"]["workload"] == workload
    }


def forward_ratio(result, name, cpu=True):
    """Per-round ratios of `name`'s median forward time to the base model's."""
    key = cpu_key("forward_seconds", result) if cpu else "forward_seconds"
    return [
        statistics.median(other) / statistics.median(base)
        for other, base in zip(result[key][name], result[key]["base"])
    ]


def flatten(rounds):
    return [value for values in rounds for value in values]


def inference_section(data, workload):
    runs = inference_runs(data, workload)
    if not runs:
        return None
    names = []
    for result in runs.values():
        names += [n for n in result["forward_seconds"] if n not in names]
    forward_rows, generate_rows = [], []
    for variant in sorted(runs, key=variant_order):
        result = runs[variant]
        row = [variant, jit_label(result)]
        for name in names:
            times = result["forward_seconds"].get(name)
            if not times:
                row.append("–")
                continue
            cell = format_summary(summarize(flatten(times)))
            if name != "base":
                cpu_ratio = format_summary(summarize(forward_ratio(result, name)), format_ratio)
                wall_ratio = format_summary(summarize(forward_ratio(result, name, cpu=False)), format_ratio)
                cell += f"; ×{cpu_ratio} CPU, ×{wall_ratio} wall"
            row.append(cell)
        forward_rows.append(row)
        tokens = result["generated_tokens_per_call"]
        generate_row = [variant]
        generate_names = [n for n in names if n in result["generate_seconds"]]
        for name in generate_names:
            seconds = result["generate_seconds"][name]
            generate_row.append(f"{tokens / statistics.median(flatten(seconds)):.0f}")
        generate_rows.append(generate_row)
    forward = table(["backend", "compilation"] + [f"{n} wall ms; ratio to base" for n in names], forward_rows)
    generate_names = [n for n in names if n != "lora_merged"]
    generate = table(["backend"] + [f"{n} tokens/s (wall)" for n in generate_names], generate_rows)
    return forward, generate


def import_section(data):
    rows = []
    for record in _ok(data["records"], ("import",)):
        result = record["result"]
        added = result["packages_added_by_keras_peft"]
        rows.append([
            result["backend"],
            f"{result['rss_after_keras_mb']:.0f}",
            f"{result['rss_after_keras_peft_mb'] - result['rss_after_keras_mb']:+.1f}",
            f"{result['import_seconds'] * 1000:.0f}",
            ", ".join(result["packages_loaded_by_keras"]) or "none",
            ", ".join(f"{name} (from {result['importers'].get(name)})" for name in added) or "none",
        ])
    if not rows:
        return None
    return table(["KERAS_BACKEND", "RSS after `import keras` MiB", "`import keras_peft` adds MiB",
                  "import keras_peft ms", "packages already loaded by keras", "packages keras_peft adds"], rows)


# ---------------------------------------------------------------- targets


def targets(data):
    """Return rows `[target, where, measured, met]` for every target that was measured."""
    rows = []
    runs = training_runs(data)
    variants = sorted({(k[0], k[1]) for k in runs if k[2] == "lora"}, key=lambda v: (v[0], variant_order(v[1])))

    def check(name, where, values, limit, strict=False, wall_values=None, steady_values=None):
        summary = summarize(values)
        if summary is None:
            return
        met = summary[0] < limit if strict else summary[0] <= limit
        measured = format_summary(summary, format_ratio)
        if wall_values:
            measured = f"CPU {measured}; wall {format_summary(summarize(wall_values), format_ratio)}"
        if steady_values:
            measured += f"; after the steps {format_summary(summarize(steady_values), format_ratio)}"
        rows.append([name, where, measured, "met" if met else "**missed**"])

    def step_ratios(numerator, denominator):
        return {
            "values": round_ratios(numerator, denominator, median_cpu_step),
            "wall_values": round_ratios(numerator, denominator, median_step),
        }

    for workload, variant in variants:
        lora = runs[(workload, variant, "lora")]
        where = f"{workload}, {variant}"
        if (workload, variant, "limit") in runs and workload != "minilm":
            check("LoRA step ÷ limit step ≤ 1.05", where, limit=1.05,
                  **step_ratios(lora, runs[(workload, variant, "limit")]))
    for workload, variant in variants:
        lora = runs[(workload, variant, "lora")]
        if (workload, variant, "keras_lora") in runs:
            check("LoRA step ÷ Keras enable_lora step < 1", f"{workload}, {variant}", limit=1.0, strict=True,
                  **step_ratios(lora, runs[(workload, variant, "keras_lora")]))
    for workload in sorted({v[0] for v in variants}):
        hf = runs.get((workload, "torch (HF PEFT)", "hf_peft_lora"))
        candidates = [v for w, v in variants if w == workload]
        if not hf or not candidates:
            continue
        fastest = min(candidates, key=lambda v: step_summary(runs[(workload, v, "lora")], cpu=True)[0])
        check("LoRA step on the fastest backend ÷ HF PEFT LoRA step ≤ 1", f"{workload}, {fastest}", limit=1.0,
              **step_ratios(runs[(workload, fastest, "lora")], hf))
    for workload in data["settings"]["repetitions"]:
        for variant, result in sorted(inference_runs(data, workload).items(), key=lambda x: variant_order(x[0])):
            where = f"{workload}, {variant}"
            check("merged LoRA forward ÷ base forward ≤ 1.02", where, forward_ratio(result, "lora_merged"), 1.02,
                  wall_values=forward_ratio(result, "lora_merged", cpu=False))
            check("unmerged LoRA forward ÷ base forward ≤ 1.10", where, forward_ratio(result, "lora"), 1.10,
                  wall_values=forward_ratio(result, "lora", cpu=False))
    def memory_ratios(numerator, denominator):
        steady = [r for r in (numerator, denominator) if all("rss_after_steps_mb" in x for x in r.values())]
        return {
            "values": round_ratios(numerator, denominator, peak_memory),
            "steady_values": round_ratios(numerator, denominator, steady_memory) if len(steady) == 2 else None,
        }

    for workload, variant in variants:
        if workload != "base":
            continue
        lora = runs[(workload, variant, "lora")]
        where = f"{workload}, {variant}"
        if (workload, variant, "limit") in runs:
            check("LoRA peak RSS ÷ limit peak RSS ≤ 1.05", where, limit=1.05,
                  **memory_ratios(lora, runs[(workload, variant, "limit")]))
        if (workload, variant, "full") in runs:
            check("LoRA peak RSS ÷ full fine-tuning peak RSS ≤ 0.75", where, limit=0.75,
                  **memory_ratios(lora, runs[(workload, variant, "full")]))
    for record in _ok(data["records"], ("import",)):
        result = record["result"]
        added = result["packages_added_by_keras_peft"]
        rows.append(["`import keras_peft` adds no backend and no keras_hub", result["backend"],
                     ", ".join(added) or "adds none", "met" if not added else "**missed**"])
    rows += trace_targets(runs)
    return rows


def trace_targets(runs):
    """Rows of the target "`fit` with jit_compile=True traces the step once".

    The target is about keras_peft's methods, so the configurations without
    keras_peft are not rows. Full fine-tuning's count is shown beside each.
    """
    rows = []
    for (workload, variant, method), rounds in sorted(runs.items(), key=lambda x: (x[0][0], variant_order(x[0][1]))):
        result = next(iter(rounds.values()))
        if result.get("jit_compile") is not True or "train_step_calls_in_fit" not in result:
            continue
        if not isinstance(methods.METHODS_BY_NAME.get(method), methods.PeftMethod):
            continue
        count = result["train_step_calls_in_fit"]
        measured = f"{count} trace(s) in {result['fit_steps']} steps"
        full = runs.get((workload, variant, "full"))
        if full and method != "full":
            measured += f" (full fine-tuning: {next(iter(full.values()))['train_step_calls_in_fit']})"
        rows.append(["`fit` with jit_compile=True traces the step once", f"{workload}, {variant}, {method}",
                     measured, "met" if count == 1 else "**missed**"])
    return rows


# ---------------------------------------------------------------- document


TARGETS_NOTE = (
    "Time ratios are judged on CPU time per step (the process's user and system time, all threads), "
    "because the machine was shared; the wall-time ratio is shown beside it. Memory ratios use peak "
    "resident memory."
)


def render(data):
    parts = [BEGIN, "", "## Run", "", header_section(data), ""]
    failed = [r for r in data["records"] if not r["result"].get("ok")]
    parts += ["## Targets", "", TARGETS_NOTE, "", table(["target", "where", "measured: median (min–max over rounds)", "result"],
                                      targets(data)), ""]
    for workload in data["settings"]["repetitions"]:
        section = training_section(data, workload)
        if section:
            parts += [f"## Training step, {workload}", "", section, ""]
        inference = inference_section(data, workload)
        if inference:
            parts += [f"## Forward pass, {workload} (ratio to the base model side by side)", "", inference[0], "",
                      f"## generate, {workload}", "", inference[1], ""]
    imports = import_section(data)
    if imports:
        parts += ["## Import", "", imports, ""]
    if failed:
        parts += ["## Failed configurations", ""]
        parts += [f"- `{r['config'].get('kind')}/{r['config'].get('workload')}/{r['config'].get('variant')}/"
                  f"{r['config'].get('method')}`: {r['result'].get('error')}" for r in failed]
        parts.append("")
    parts.append(END)
    return "\n".join(parts)


def write_docs(path, generated):
    """Replace the generated section of `path`, keeping the text around it."""
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            before = text.split(BEGIN, 1)[0]
            after = text.split(END, 1)[1]
            path.write_text(before + generated + after)
            return
        path.write_text(text.rstrip() + "\n\n" + generated + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Benchmarks\n\n" + generated + "\n")
