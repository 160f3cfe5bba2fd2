"""Smoke test of the benchmark harness on its tiny GPT-2 shape.

It runs the training and inference workers in this process for one step
and renders the report from their results. Nothing here checks a time:
the harness only has to run end to end and count parameters correctly.
"""

import argparse
import pathlib
import sys

import keras
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import allocation_sites  # noqa: E402
import cli  # noqa: E402
import inference  # noqa: E402
import memory_probe  # noqa: E402
import rank_products  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import training  # noqa: E402
import workloads  # noqa: E402

TINY = workloads.GPT2_SIZES["tiny"]


def _train(method, **settings):
    backend = keras.backend.backend()
    config = {
        "kind": "train",
        "workload": "tiny",
        "variant": backend,
        "backend": backend,
        "jit_compile": "auto",
        "method": method,
        "batch_size": 2,
        "fit_steps": 2,
        "warmup_steps": 0,
        "steps": 1,
        "rounds": 1,
        **settings,
    }
    return config, training.run(config)


def _record(config, result):
    return {"config": config, "round": 0, "result": dict(result, ok=True), "wall_seconds": 0.0}


def test_harness_end_to_end():
    lora_config, lora = _train("lora")
    limit_config, limit = _train("limit")

    # LoRA of rank 8 on query and value: 2 projections · 8 · (d + d) per block.
    assert lora["trainable_parameters"] == TINY["num_layers"] * 2 * 8 * (2 * TINY["hidden_dim"])
    # The limit trains the first block's query and value biases (d each).
    assert limit["trainable_parameters"] == 2 * TINY["hidden_dim"]
    assert len(lora["step_seconds"]) == 1
    assert lora["peak_rss_mb"] > 0
    assert lora["train_step_calls_in_fit"] >= 1

    backend = keras.backend.backend()
    infer_config = {
        "kind": "infer",
        "workload": "tiny",
        "variant": backend,
        "backend": backend,
        "jit_compile": "auto",
        "batch_size": 2,
        "methods": [],
        "rounds": 1,
        "warmup_steps": 1,
        "forward_calls": 1,
        # generate() compiles one more function per variant; leave it out to stay fast.
        "generate_calls": 0,
    }
    infer = inference.run(infer_config)
    assert set(infer["forward_seconds"]) == {"base", "lora", "lora_merged"}
    assert infer["generate_seconds"] == {}

    data = {
        "command": "pytest",
        "started": "2000-01-01T00:00:00+00:00",
        "wall_seconds": 0.0,
        "load_average_before": [0.0, 0.0, 0.0],
        "load_average_after": [0.0, 0.0, 0.0],
        "machine": report.machine_info(),
        "versions": report.versions(),
        "settings": {
            "method_names": ["lora", "limit"],
            "repetitions": {"tiny": {"rounds": 1, "fit_steps": 2, "warmup_steps": 0, "steps": 1}},
            "batch_sizes": {"tiny": 2},
            "threads": None,
            "tf_jit": "auto",
            "quick": True,
        },
        "records": [_record(lora_config, lora), _record(limit_config, limit), _record(infer_config, infer)],
    }
    text = report.render(data)
    assert f"| {backend} | lora | {lora['trainable_parameters']:,} |" in text
    assert "LoRA step ÷ limit step ≤ 1.05" in text
    assert "merged LoRA forward ÷ base forward ≤ 1.02" in text
    assert "## Failed configurations" not in text


def test_baselines_build_optimizer_first():
    _, lora = _train("lora", baseline_optimizer="built")
    _, limit = _train("limit", baseline_optimizer="built")
    _, lazy_limit = _train("limit", baseline_optimizer="lazy")

    assert not lora["optimizer_built_after_compile"]
    assert limit["optimizer_built_after_compile"]
    assert not lazy_limit["optimizer_built_after_compile"]


def test_trace_rows_list_peft_methods():
    def traced(count):
        return {0: {"jit_compile": True, "train_step_calls_in_fit": count, "fit_steps": 3}}

    runs = {
        ("small", "tensorflow+xla", "full"): traced(2),
        ("small", "tensorflow+xla", "limit"): traced(2),
        ("small", "tensorflow+xla", "lora"): traced(1),
        ("small", "tensorflow+xla", "adapter"): traced(2),
    }

    rows = report.trace_targets(runs)

    assert [row[1] for row in rows] == ["small, tensorflow+xla, lora", "small, tensorflow+xla, adapter"]
    assert rows[0][2:] == ["1 trace(s) in 3 steps (full fine-tuning: 2)", "met"]
    assert rows[1][3] == "**missed**"


@pytest.mark.parametrize("existing", [None, "intro\n\n{generated}\n\nanalysis\n"])
def test_write_docs_keeps_text_outside_markers(tmp_path, existing):
    path = tmp_path / "benchmarks.md"
    old = report.BEGIN + "\nold figures\n" + report.END
    if existing is not None:
        path.write_text(existing.format(generated=old))
    new = report.BEGIN + "\nnew figures\n" + report.END

    report.write_docs(path, new)

    text = path.read_text()
    assert "new figures" in text
    assert "old figures" not in text
    if existing is not None:
        assert text.startswith("intro\n\n")
        assert text.endswith("\n\nanalysis\n")


def test_memory_probe_prepares_and_trains():
    parser = argparse.ArgumentParser()
    memory_probe.add_arguments(parser)
    args = parser.parse_args(["tiny", "lora", "--batch", "2", "--fit-steps", "1", "--steps", "1"])
    model, (x, y, sample_weight) = memory_probe.prepare(args)
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]

    memory_probe.train(model, (x, y, sample_weight), args)

    after = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2
    assert any(not np.array_equal(old, new) for old, new in zip(before, after))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 is part of glibc")
def test_heap_in_use_is_positive_on_linux():
    assert memory_probe.heap_in_use_mb() > 0


def test_allocation_site_skips_allocator_frames():
    stack = [
        ("malloc", "libc.so.6", 0),
        ("operator new(unsigned long)", "libstdc++.so.6", 0),
        ("std::vector<int>::_M_realloc_insert", "vector.tcc", 0),
        ("tensorflow::ShapeRefiner::AddNode(tensorflow::Node const*)", "shape_refiner.cc", 0),
        ("tensorflow::GraphConstructor::Convert()", "graph_constructor.cc", 0),
    ]

    assert allocation_sites.allocation_site(stack) == "tensorflow::ShapeRefiner::AddNode(tensorflow::Node const*)"
    assert allocation_sites.allocation_site(stack[:2]) == "(allocator only)"


def test_int_at_least_accepts_and_rejects():
    parse = cli.int_at_least(1)

    assert parse("3") == 3
    assert parse("1") == 1
    with pytest.raises(argparse.ArgumentTypeError, match="must be at least 1, received 0"):
        parse("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, received 'x'"):
        parse("x")


@pytest.mark.parametrize(
    "main,argv,message",
    [
        (memory_probe.main, ["tiny", "lora", "--batch", "0"], "--batch: must be at least 1"),
        (memory_probe.main, ["tiny", "lora", "--batch", "2", "--steps", "-1"], "--steps: must be at least 0"),
        (rank_products.main, ["--tokens", "0", "--width", "8"], "--tokens: must be at least 1"),
        (run.main, ["--rounds", "0"], "--rounds: must be at least 1"),
        (allocation_sites.main, ["compare", "a.bin", "b.bin", "--top", "0"], "--top: must be at least 1"),
    ],
)
def test_scripts_reject_bad_counts(main, argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        main(argv)

    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_rejects_missing_capture(tmp_path, capsys):
    missing = str(tmp_path / "missing.bin")

    with pytest.raises(SystemExit):
        allocation_sites.main(["compare", missing, missing])

    assert f"capture file not found: {missing!r}" in capsys.readouterr().err
