import os

import keras
import keras_hub
import numpy as np
import pytest

import keras_peft
import tiny_models
from keras_peft.core.paths import LayerIndex
from keras_peft.layers import LoRADense
from keras_peft.methods.base import method_from_config
from keras_peft.methods.base import serialize_method
from tiny_models import to_numpy

HIDDEN = 8
INTERMEDIATE = 16
CLASSES = 2


def model_state(model):
    """Everything a failed apply must leave unchanged."""
    return {
        "layers": [(e.path, type(e.layer).__name__) for e in LayerIndex(model)],
        "weights": [(v.path, v.trainable, to_numpy(v).tobytes()) for v in model.weights],
        "peft_state": vars(model).get("_keras_peft_state"),
    }


def encoder_layer_biases(prefix, attention):
    return [
        f"{prefix}/{attention}/attention_output/bias",
        f"{prefix}/self_attention_layer_norm/beta",
        f"{prefix}/feedforward_layer_norm/beta",
        f"{prefix}/feedforward_intermediate_dense/bias",
        f"{prefix}/feedforward_output_dense/bias",
    ]


def decoder_layer_biases(prefix):
    return encoder_layer_biases(prefix, "self_attention") + [
        f"{prefix}/cross_attention/attention_output/bias",
        f"{prefix}/cross_attention_layer_norm/beta",
    ]


# The variables BitFit trains on the two-layer tiny models, written out by hand:
# attention output bias, layer-norm beta, both feed-forward biases, the
# cross-attention output bias in decoders, and the task head.
EXPECTED = {
    "bert": ["bert_backbone/embeddings_layer_norm/beta", "logits/bias", "logits/kernel"]
    + [b for i in (0, 1) for b in encoder_layer_biases(f"bert_backbone/transformer_layer_{i}", "self_attention_layer")],
    "gpt2": ["gpt2_backbone/layer_norm/beta"]
    + [b for i in (0, 1) for b in encoder_layer_biases(f"gpt2_backbone/transformer_layer_{i}", "self_attention")],
    "bart": ["bart_backbone/encoder_embeddings_layer_norm/beta", "bart_backbone/decoder_embeddings_layer_norm/beta"]
    + [
        b
        for i in (0, 1)
        for b in encoder_layer_biases(f"bart_backbone/transformer_encoder_layer_{i}", "self_attention_layer")
    ]
    + [b for i in (0, 1) for b in decoder_layer_biases(f"bart_backbone/transformer_decoder_layer_{i}")],
}

# Parameter counts by hand. Each block has the attention output bias (d), two
# betas (2d) and the feed-forward biases (intermediate + d). Decoder blocks add
# the cross-attention output bias and its norm's beta (2d). The embedding or
# final norms and the head come on top.
BLOCK = HIDDEN + 2 * HIDDEN + INTERMEDIATE + HIDDEN
MANUAL_COUNTS = {
    "bert": HIDDEN + 2 * BLOCK + (HIDDEN * CLASSES + CLASSES),
    "gpt2": HIDDEN + 2 * BLOCK,
    "bart": 2 * HIDDEN + 2 * BLOCK + 2 * (BLOCK + 2 * HIDDEN),
}

BUILDERS = {
    "bert": tiny_models.bert_classifier,
    "gpt2": tiny_models.gpt2_causal_lm,
    "bart": tiny_models.bart_seq2seq_lm,
}


def training_data(family, batch=4):
    if family == "bert":
        return tiny_models.token_inputs(batch, segment_ids=True), np.array([0, 1] * (batch // 2))
    if family == "gpt2":
        x = tiny_models.token_inputs(batch)
        return x, np.roll(x["token_ids"], -1, axis=1)
    x = tiny_models.seq2seq_inputs(batch)
    return x, np.roll(x["decoder_token_ids"], -1, axis=1)


def variables_by_key(model):
    index = LayerIndex(model)
    return {f"{e.path}/{v.name}": v for e in index for v in index.owned_variables(e)}


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart"])
def test_trainable_variables_exact(family):
    model = BUILDERS[family]()
    report = keras_peft.apply(model, keras_peft.BiasOnly())

    assert sorted(report.trainable_variables) == sorted(EXPECTED[family])
    by_key = variables_by_key(model)
    expected_ids = {id(by_key[key]) for key in EXPECTED[family]}
    assert {id(v) for v in model.trainable_weights} == expected_ids


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart"])
def test_report_counts_match_manual_count(family):
    model = BUILDERS[family]()
    report = keras_peft.apply(model, keras_peft.BiasOnly())

    assert report.trainable_parameters == MANUAL_COUNTS[family]
    assert sum(report.trainable_variables.values()) == MANUAL_COUNTS[family]
    assert report.total_parameters == model.count_params()


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart"])
def test_fit_changes_only_selected_biases(family):
    model = BUILDERS[family](num_layers=1)
    report = keras_peft.apply(model, keras_peft.BiasOnly())
    by_key = variables_by_key(model)
    before = {key: to_numpy(v).copy() for key, v in by_key.items()}

    x, y = training_data(family)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=4, epochs=3, verbose=0)

    changed = {key for key, v in by_key.items() if not np.array_equal(to_numpy(v), before[key])}
    assert changed == set(report.trainable_variables)


def test_include_qkv_adds_query_key_value_biases():
    model = tiny_models.bert_classifier()
    report = keras_peft.apply(model, keras_peft.BiasOnly(include_qkv=True))

    qkv = {
        f"bert_backbone/transformer_layer_{i}/self_attention_layer/{name}/bias"
        for i in (0, 1)
        for name in ("query", "key", "value")
    }
    assert set(report.trainable_variables) == set(EXPECTED["bert"]) | qkv
    # Each query/key/value bias has shape (heads, head_dim) = (2, 4).
    assert report.trainable_parameters == MANUAL_COUNTS["bert"] + len(qkv) * HIDDEN


def test_components_select_by_name():
    model = tiny_models.bart_seq2seq_lm()
    report = keras_peft.apply(model, keras_peft.BiasOnly(components=["cross_attention_output", "value"]))

    expected = {
        f"bart_backbone/transformer_decoder_layer_{i}/cross_attention/attention_output/bias" for i in (0, 1)
    } | {
        f"bart_backbone/{block}_{i}/{attention}/value/bias"
        for i in (0, 1)
        for block, attention in (
            ("transformer_encoder_layer", "self_attention_layer"),
            ("transformer_decoder_layer", "self_attention"),
            ("transformer_decoder_layer", "cross_attention"),
        )
    }
    assert set(report.trainable_variables) == expected


def test_train_head_false_keeps_only_head_bias():
    model = tiny_models.bert_classifier()
    report = keras_peft.apply(model, keras_peft.BiasOnly(), train_head=False)

    assert "logits/bias" in report.trainable_variables
    assert "logits/kernel" not in report.trainable_variables
    assert report.head_paths == []


def test_targets_and_exclude_by_path():
    model = tiny_models.bert_classifier()
    method = keras_peft.BiasOnly(targets=["pooled_dense"], exclude=["*/transformer_layer_1/*"])
    report = keras_peft.apply(model, method)

    keys = set(report.trainable_variables)
    assert "bert_backbone/pooled_dense/bias" in keys
    assert "bert_backbone/pooled_dense/kernel" not in keys
    assert not any("transformer_layer_1" in key for key in keys)
    assert "bert_backbone/transformer_layer_0/feedforward_output_dense/bias" in keys


def test_shares_paths_with_lora():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["query", "value"]))
    report = keras_peft.apply(model, keras_peft.BiasOnly(include_qkv=True))

    query = model.backbone.transformer_layers[0]._self_attention_layer._query_dense
    assert isinstance(query, LoRADense)
    assert query.base_layer.bias.trainable
    assert not query.base_layer.kernel.trainable
    assert "bert_backbone/transformer_layer_0/self_attention_layer/query" in (
        report.adapted_paths[repr(keras_peft.BiasOnly(include_qkv=True))]
    )


def test_fused_qkv_needs_all_three():
    backbone = keras_hub.models.GPTNeoXBackbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=32
    )
    before = model_state(backbone)
    with pytest.raises(ValueError, match="one fused projection"):
        keras_peft.apply(backbone, keras_peft.BiasOnly(components=["query"]))
    assert model_state(backbone) == before

    report = keras_peft.apply(backbone, keras_peft.BiasOnly(include_qkv=True))
    assert any(key.endswith("query_key_value/bias") for key in report.trainable_variables)


def test_remove_restores_biases_and_merge_keeps_them():
    model = tiny_models.bert_classifier()
    x = tiny_models.token_inputs(segment_ids=True)

    def hidden_states():
        return to_numpy(model.backbone(x)["sequence_output"])

    pretrained = hidden_states()
    keras_peft.apply(model, keras_peft.BiasOnly())
    feedforward = model.backbone.transformer_layers[1]._feedforward_output_dense
    feedforward.bias.assign(np.linspace(-1, 1, HIDDEN, dtype="float32"))
    tuned = hidden_states()
    assert np.abs(tuned - pretrained).max() > 1e-3

    keras_peft.remove(model)
    np.testing.assert_array_equal(hidden_states(), pretrained)

    keras_peft.apply(model, keras_peft.BiasOnly())
    feedforward.bias.assign(np.linspace(-1, 1, HIDDEN, dtype="float32"))
    keras_peft.merge(model)
    np.testing.assert_array_equal(hidden_states(), tuned)
    assert "_keras_peft_state" not in vars(model)
    assert all(v.trainable for v in model.weights)


def test_save_and_load_round_trip(tmp_path):
    trained = tiny_models.bert_classifier()
    fresh = tiny_models.bert_classifier()
    fresh.set_weights(trained.get_weights())
    keras_peft.apply(trained, keras_peft.BiasOnly())
    rng = np.random.default_rng(0)
    for variable in trained.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))

    keys = keras_peft.save_adapter(trained, tmp_path / "bitfit")
    keras_peft.load_adapter(fresh, tmp_path / "bitfit")

    # Only the biases and the head are stored.
    assert sorted(keys) == sorted(EXPECTED["bert"])
    x = tiny_models.token_inputs(segment_ids=True)
    np.testing.assert_array_equal(to_numpy(fresh(x)), to_numpy(trained(x)))
    assert os.path.getsize(tmp_path / "bitfit" / "adapter_model.safetensors") < 4096


def test_config_round_trip():
    method = keras_peft.BiasOnly(components=["ffn_output", "head"], include_qkv=True, exclude=["pooled_dense"])
    assert method_from_config(serialize_method(method)) == method


@pytest.mark.parametrize("build", [tiny_models.llama_causal_lm, tiny_models.t5_seq2seq_lm])
def test_bias_free_model_raises_and_is_unchanged(build):
    model = build(num_layers=1)
    before = model_state(model)

    with pytest.raises(ValueError, match="no bias terms") as error:
        keras_peft.apply(model, keras_peft.BiasOnly())

    assert "LoRA" in str(error.value)
    assert model_state(model) == before


def test_missing_component_raises_and_is_unchanged():
    model = tiny_models.bert_classifier()
    before = model_state(model)

    with pytest.raises(ValueError, match="no trainable bias in the component"):
        keras_peft.apply(model, keras_peft.BiasOnly(components=["ffn_output", "cross_attention_output"]))

    assert model_state(model) == before


def test_unknown_target_raises_and_is_unchanged():
    model = tiny_models.bert_classifier()
    before = model_state(model)

    with pytest.raises(ValueError, match="matched no layer"):
        keras_peft.apply(model, keras_peft.BiasOnly(targets=["no_such_layer"]))

    assert model_state(model) == before


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"components": ["attention"]}, ValueError, "Valid components"),
        ({"components": []}, ValueError, "at least one component"),
        ({"components": 3}, TypeError, "list of component names"),
        ({"include_qkv": "yes"}, TypeError, "include_qkv"),
        ({"targets": [3]}, TypeError, "non-empty string"),
    ],
)
def test_invalid_arguments(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        keras_peft.BiasOnly(**kwargs)


def test_non_string_target_cannot_be_saved():
    method = keras_peft.BiasOnly(targets=[keras.layers.Dense])
    with pytest.raises(TypeError, match="cannot be written to an adapter file"):
        method.get_config()
