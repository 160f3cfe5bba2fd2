"""Measure keras_peft's training and inference speed and memory.

Usage (from the repository root):

    python benchmarks/run.py --sizes small base --backends jax tensorflow torch
    python benchmarks/run.py --quick            # one short round, small only
    python benchmarks/run.py --report-only benchmarks/results/latest.json

Each configuration (workload, backend, method) runs in its own subprocess,
so its peak resident memory is its own. Training configurations are
repeated in rounds and every round runs all of them one after another, so
the ratios (LoRA / limit, LoRA / full, ...) compare runs made side by side
on a machine whose load changes over time. The raw results are written to
`benchmarks/results/latest.json`, and a report section is printed and
written into `docs/benchmarks.md` between the two marker lines (text outside
them is kept).
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cli  # noqa: E402
import methods  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
from worker import RESULT_PREFIX  # noqa: E402

RESULTS = HERE / "results" / "latest.json"
DOCS = HERE.parent / "docs" / "benchmarks.md"
BACKENDS = ("jax", "tensorflow", "torch")

# Repetitions per workload. `rounds` is the number of driver rounds, with one
# process per configuration per round. Each training process runs a fit of
# `fit_steps` (which also counts traces), then `warmup_steps` untimed and
# `steps` timed train_on_batch calls. The inference worker alternates its
# variants for `infer_rounds` rounds of `forward_calls` forward calls and
# `generate_calls` generate calls each.
REPETITIONS = {
    "tiny": {"rounds": 1, "fit_steps": 2, "warmup_steps": 1, "steps": 2,
             "infer_rounds": 1, "forward_calls": 1, "generate_calls": 1},
    "small": {"rounds": 2, "fit_steps": 3, "warmup_steps": 1, "steps": 6,
              "infer_rounds": 3, "forward_calls": 4, "generate_calls": 1},
    "base": {"rounds": 1, "fit_steps": 2, "warmup_steps": 1, "steps": 4,
             "infer_rounds": 2, "forward_calls": 2, "generate_calls": 1},
    "minilm": {"rounds": 1, "fit_steps": 3, "warmup_steps": 1, "steps": 6},
}
QUICK = {"rounds": 1, "fit_steps": 2, "warmup_steps": 1, "steps": 2,
         "infer_rounds": 1, "forward_calls": 1, "generate_calls": 1}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=workloads.WORKLOADS, default=None,
                        help="workloads to measure: GPT-2 shapes 'small' and 'base', the pretrained 'minilm' "
                             "classifier, and 'tiny', which only checks that the harness runs "
                             "(default: small base minilm, or small with --quick)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="Keras backends to measure")
    parser.add_argument("--backends-for", action="append", default=[], metavar="SIZE=B1,B2",
                        help="restrict one workload to some backends, e.g. base=jax,torch (repeatable)")
    parser.add_argument("--tf-jit", choices=("auto", "xla", "both"), default="both",
                        help="TensorFlow compilation: jit_compile='auto' (no XLA on CPU-only machines), "
                             "jit_compile=True, or both (default)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"training configurations (default: every available one of {[m.name for m in methods.METHODS]})")
    parser.add_argument("--methods-for", action="append", default=[], metavar="SIZE=M1,M2",
                        help="restrict one workload to some training configurations, e.g. base=full,lora,limit (repeatable)")
    parser.add_argument("--rounds", type=cli.int_at_least(1), default=None,
                        help="override the rounds of every workload")
    parser.add_argument("--steps", type=cli.int_at_least(1), default=None,
                        help="override the timed steps of every workload")
    parser.add_argument("--infer-rounds", type=cli.int_at_least(1), default=None,
                        help="override the alternating forward/generate rounds of every workload")
    parser.add_argument("--baseline-optimizer", choices=("built", "lazy"), default="built",
                        help="'built' (default): the configurations without keras_peft call "
                             "model.optimizer.build(model.trainable_variables) after compile, as keras_peft "
                             "does for its methods on TensorFlow; 'lazy': they keep Keras' default, which on "
                             "TensorFlow builds the optimizer inside the first trace of the step")
    parser.add_argument("--threads", type=cli.int_at_least(1), default=None,
                        help="CPU threads per backend (sets OMP, MKL, XLA and TensorFlow thread counts); "
                             "default: each backend's own default")
    parser.add_argument("--no-inference", action="store_true", help="skip forward and generate timings")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face PEFT comparison")
    parser.add_argument("--quick", action="store_true", help="one round of two timed steps per configuration")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration process")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS, help="where to write the raw results (JSON)")
    parser.add_argument("--docs", type=pathlib.Path, default=DOCS, help="Markdown file to update")
    parser.add_argument("--no-docs", action="store_true", help="print the report without writing the Markdown file")
    parser.add_argument("--report-only", type=pathlib.Path, default=None, metavar="JSON",
                        help="write the report from saved raw results without measuring")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = ["small"] if args.quick else ["small", "base", "minilm"]
    return args


def backend_variants(backend, tf_jit):
    """Return `[(label, backend, jit_compile)]` for one backend."""
    if backend != "tensorflow":
        return [(backend, backend, "auto")]
    variants = []
    if tf_jit in ("auto", "both"):
        variants.append(("tensorflow", "tensorflow", "auto"))
    if tf_jit in ("xla", "both"):
        variants.append(("tensorflow+xla", "tensorflow", True))
    return variants


def backends_by_size(args):
    chosen = {size: list(args.backends) for size in args.sizes}
    for item in args.backends_for:
        size, _, names = item.partition("=")
        if size not in chosen:
            raise SystemExit(f"--backends-for {item!r}: {size!r} is not among --sizes {args.sizes}.")
        backends = [name for name in names.split(",") if name]
        unknown = [name for name in backends if name not in BACKENDS]
        if unknown:
            raise SystemExit(f"--backends-for {item!r}: unknown backend(s) {unknown}; use {list(BACKENDS)}.")
        chosen[size] = backends
    return chosen


def keras_peft_public_names(backend):
    """Return `keras_peft.__all__`, read in a subprocess so this process loads no backend."""
    code = "import json, keras_peft; print(json.dumps(keras_peft.__all__))"
    completed = subprocess.run([sys.executable, "-c", code], env=subprocess_env(backend, None),
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def methods_by_size(args, method_names):
    chosen = {size: list(method_names) for size in args.sizes}
    for item in args.methods_for:
        size, _, names = item.partition("=")
        if size not in chosen:
            raise SystemExit(f"--methods-for {item!r}: {size!r} is not among --sizes {args.sizes}.")
        requested = [name for name in names.split(",") if name]
        unknown = [name for name in requested if name not in methods.METHODS_BY_NAME]
        if unknown:
            raise SystemExit(f"--methods-for {item!r}: unknown method(s) {unknown}.")
        chosen[size] = [name for name in requested if name in method_names]
    return chosen


def available_methods(requested, backend):
    available = methods.available_methods(keras_peft_public_names(backend))
    if requested is None:
        return available
    unknown = [name for name in requested if name not in methods.METHODS_BY_NAME]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; known: {[m.name for m in methods.METHODS]}.")
    missing = [name for name in requested if name not in available]
    if missing:
        print(f"Skipping {missing}: not in keras_peft.__all__ of the installed keras_peft.", file=sys.stderr)
    return [name for name in requested if name in available]


def hf_available():
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("torch", "transformers", "peft"))


def repetitions_by_size(args):
    repetitions = {}
    for size in args.sizes:
        reps = dict(QUICK if args.quick else REPETITIONS[size])
        if args.rounds is not None:
            reps["rounds"] = args.rounds
        if args.steps is not None:
            reps["steps"] = args.steps
        if args.infer_rounds is not None and "infer_rounds" in reps:
            reps["infer_rounds"] = args.infer_rounds
        repetitions[size] = reps
    return repetitions


def plan(args):
    """Return `(round_configs, once_configs, settings)`.

    Round configurations run once per round; the others (import checks and
    inference, which alternates its variants itself) run once.
    """
    method_names = available_methods(args.methods, args.backends[0])
    repetitions = repetitions_by_size(args)
    backends = backends_by_size(args)
    size_methods = methods_by_size(args, method_names)
    # NOTE: only an NVIDIA device file counts as an accelerator here; the
    # smaller CPU batch of a workload is used otherwise.
    accelerator = os.path.exists("/dev/nvidia0")
    batch_sizes = {size: workloads.batch_size_of(size, accelerator) for size in args.sizes}

    round_configs, once_configs = [], []
    for size in args.sizes:
        reps = repetitions[size]
        common = {"workload": size, "batch_size": batch_sizes[size], "fit_steps": reps["fit_steps"],
                  "baseline_optimizer": args.baseline_optimizer,
                  "warmup_steps": reps["warmup_steps"], "steps": reps["steps"], "rounds": reps["rounds"]}
        causal_lm = workloads.is_causal_lm(size)
        for backend in backends[size]:
            for label, backend_name, jit in backend_variants(backend, args.tf_jit):
                variant = dict(common, variant=label, backend=backend_name, jit_compile=jit)
                for method in size_methods[size]:
                    round_configs.append(dict(variant, kind="train", method=method))
                if causal_lm and not args.no_inference:
                    once_configs.append(dict(variant, kind="infer", methods=size_methods[size],
                                             rounds=reps["infer_rounds"], forward_calls=reps["forward_calls"],
                                             generate_calls=reps["generate_calls"]))
        if causal_lm and not args.no_hf and hf_available():
            round_configs.append(dict(common, kind="hf_train", variant="torch (HF PEFT)", backend="torch",
                                      jit_compile=False, method="hf_peft_lora"))

    all_backends = sorted({b for size in args.sizes for b in backends[size]})
    imports = [dict(kind="import", backend=b, variant=b, workload="-", method="-") for b in all_backends]
    settings = {"method_names": method_names, "methods_by_size": size_methods, "repetitions": repetitions,
                "batch_sizes": batch_sizes, "threads": args.threads, "tf_jit": args.tf_jit, "quick": args.quick,
                "baseline_optimizer": args.baseline_optimizer}
    return round_configs, imports + once_configs, settings


def subprocess_env(backend, threads):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    # NOTE: JAX 0.10 on a CPU still ran up to two threads with these XLA
    # flags (its CPU time per step exceeded the wall time), so `--threads`
    # bounds torch and TensorFlow but not JAX.
    if threads:
        count = str(threads)
        env.update(OMP_NUM_THREADS=count, MKL_NUM_THREADS=count, TF_NUM_INTRAOP_THREADS=count,
                   TF_NUM_INTEROP_THREADS=count)
        flags = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} " \
                f"intra_op_parallelism_threads={count}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    return env


def run_config(config, threads, timeout):
    """Run one configuration in a fresh process; return its result dict."""
    command = [sys.executable, str(HERE / "worker.py"), json.dumps(config)]
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, env=subprocess_env(config["backend"], threads), cwd=HERE.parent,
                                   capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}, time.perf_counter() - start
    wall = time.perf_counter() - start
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):]), wall
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    return {"ok": False, "error": f"exit code {completed.returncode}: " + " | ".join(tail)}, wall


def describe(config):
    parts = [config["kind"], config["workload"], config["variant"], config.get("method", "-")]
    return "/".join(str(p) for p in parts)


def run_all(args, command):
    round_configs, once_configs, settings = plan(args)
    rounds = max([c["rounds"] for c in round_configs], default=1)
    records = []
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    load_before = os.getloadavg()

    def execute(config, round_index):
        result, wall = run_config(config, args.threads, args.timeout)
        records.append({"config": config, "round": round_index, "result": result, "wall_seconds": wall})
        status = "ok" if result.get("ok") else "FAILED: " + result.get("error", "")
        print(f"[{time.perf_counter() - start:7.0f} s] round {round_index} {describe(config)} "
              f"({wall:.0f} s) {status}", flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        save(args.results, command, started, settings, records, load_before, time.perf_counter() - start)

    for config in once_configs:
        if config["kind"] == "import":
            execute(config, 0)
    for round_index in range(rounds):
        todo = [c for c in round_configs if round_index < c["rounds"]]
        # Rotate and alternate the order so no configuration always runs first.
        shift = round_index % max(len(todo), 1)
        todo = todo[shift:] + todo[:shift]
        if round_index % 2:
            todo.reverse()
        for config in todo:
            execute(config, round_index)
    for config in once_configs:
        if config["kind"] != "import":
            execute(config, 0)
    return load(args.results)


def save(path, command, started, settings, records, load_before, wall_seconds):
    data = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": report.machine_info(),
        "versions": report.versions(),
        "settings": settings,
        "records": records,
    }
    path.write_text(json.dumps(data, indent=1))


def load(path):
    return json.loads(path.read_text())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report_only is not None:
        data = load(args.report_only)
    else:
        command = "python benchmarks/run.py " + " ".join(argv)
        data = run_all(args, command.strip())
    text = report.render(data)
    print(text)
    if not args.no_docs:
        report.write_docs(args.docs, text)
        print(f"Wrote {args.docs}")
    failed = [r for r in data["records"] if not r["result"].get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
