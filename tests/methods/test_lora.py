import re

import keras
import numpy as np
import pytest

import keras_peft
import tiny_models
from keras_peft.core.paths import LayerIndex
from keras_peft.layers import LoRADense
from tiny_models import to_numpy


def model_state(model):
    """Everything a failed apply must leave unchanged."""
    return {
        "layers": [(e.path, type(e.layer).__name__) for e in LayerIndex(model)],
        "weights": [(v.path, v.trainable, to_numpy(v).tobytes()) for v in model.weights],
        "trainable": [v.path for v in model.trainable_weights],
    }


def set_lora_weights(model, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        if "lora_kernel" in variable.path:
            variable.assign((scale * rng.normal(size=variable.shape)).astype("float32"))


# (builder, input builder, adapted paths, LoRA parameters per unit of rank)
FAMILIES = {
    "bert": (
        tiny_models.bert_classifier,
        lambda: tiny_models.token_inputs(segment_ids=True),
        [f"bert_backbone/transformer_layer_{i}/self_attention_layer/{p}" for p in ("query", "value") for i in (0, 1)],
        4 * (8 + 8),
    ),
    "gpt2": (
        tiny_models.gpt2_causal_lm,
        tiny_models.token_inputs,
        [f"gpt2_backbone/transformer_layer_{i}/self_attention/{p}" for p in ("query", "value") for i in (0, 1)],
        4 * (8 + 8),
    ),
    "llama": (
        tiny_models.llama_causal_lm,
        tiny_models.token_inputs,
        [f"llama_backbone/transformer_layer_{i}/self_attention/{p}" for p in ("query", "value") for i in (0, 1)],
        # query (16 -> 4 heads x 4) and value (16 -> 2 key/value heads x 4), two layers.
        2 * ((16 + 16) + (16 + 8)),
    ),
    "gemma": (
        tiny_models.gemma_causal_lm,
        tiny_models.token_inputs,
        [f"gemma_backbone/decoder_block_{i}/attention/{p}" for p in ("query", "value") for i in (0, 1)],
        # query kernel (4 heads, 16, 4): 16 in, 16 out; value (1 head, 16, 4): 16 in, 4 out.
        2 * ((16 + 16) + (16 + 4)),
    ),
    "bart": (
        tiny_models.bart_seq2seq_lm,
        tiny_models.seq2seq_inputs,
        [
            f"bart_backbone/transformer_encoder_layer_{i}/self_attention_layer/{p}"
            for p in ("query", "value")
            for i in (0, 1)
        ],
        12 * (8 + 8),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_apply_paths_counts_and_identity(family):
    build, make_inputs, expected_paths, per_rank = FAMILIES[family]
    model = build()
    x = make_inputs()
    before = to_numpy(model(x))
    head_before = sum(int(np.prod(v.shape)) for v in model.trainable_weights if "logits" in v.path)

    report = keras_peft.apply(model, keras_peft.LoRA(rank=2, alpha=4))

    (paths,) = report.adapted_paths.values()
    for path in expected_paths:
        assert path in paths
    if family == "bart":
        # Decoder self- and cross-attention are adapted too: 2 layers x 3 attentions x (q, v).
        assert len(paths) == 12
        assert any("cross_attention/query" in p for p in paths)
    else:
        assert sorted(paths) == sorted(expected_paths)
    assert report.trainable_parameters == 2 * per_rank + head_before
    assert report.total_parameters == sum(int(np.prod(v.shape)) for v in model.weights)
    for path in paths:
        assert isinstance(LayerIndex(model).get(path).layer, LoRADense)
    np.testing.assert_array_equal(to_numpy(model(x)), before)


def test_llama_grouped_query_value_factor_shapes():
    model = tiny_models.llama_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(rank=3, targets=["value"]))
    layer = model.backbone.transformer_layers[0]._self_attention_layer._value_dense
    assert isinstance(layer, LoRADense)
    assert tuple(layer.lora_kernel_a.shape) == (16, 3)
    assert tuple(layer.lora_kernel_b.shape) == (3, 2 * 4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_generate_same_tokens_merged_and_unmerged(family):
    build, make_inputs, _, _ = FAMILIES[family]
    model = build()
    keras_peft.apply(model, keras_peft.LoRA(rank=2, alpha=4, targets=["query", "key", "value", "attention_output"]))
    set_lora_weights(model, seed=3, scale=0.5)
    model.compile(sampler="greedy")
    prompt = make_inputs()
    prompt["padding_mask"][:, 3:] = 0
    unmerged = to_numpy(model.generate(prompt, max_length=8, stop_token_ids=None))
    logits_unmerged = to_numpy(model(make_inputs()))

    keras_peft.merge(model)
    assert not any(isinstance(e.layer, LoRADense) for e in LayerIndex(model))
    merged = to_numpy(model.generate(prompt, max_length=8, stop_token_ids=None))
    np.testing.assert_array_equal(merged["token_ids"], unmerged["token_ids"])
    # Merging changes the summation order only; float32 rounding stays near 1e-6.
    np.testing.assert_allclose(to_numpy(model(make_inputs())), logits_unmerged, atol=1e-5)


def test_generate_sees_trained_adapter():
    model = tiny_models.gpt2_causal_lm()
    model.compile(sampler="greedy")
    prompt = tiny_models.token_inputs()
    prompt["padding_mask"][:, 3:] = 0
    base_tokens = to_numpy(model.generate(prompt, max_length=8, stop_token_ids=None))["token_ids"]
    keras_peft.apply(model, keras_peft.LoRA(rank=4, targets=["query", "value", "attention_output"]))
    set_lora_weights(model, seed=1, scale=3.0)
    adapted = to_numpy(model.generate(prompt, max_length=8, stop_token_ids=None))["token_ids"]
    assert not np.array_equal(adapted, base_tokens)


def test_fit_updates_only_lora_and_head():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.LoRA(rank=2))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    before = {v.path: to_numpy(v).copy() for v in model.weights}
    x = tiny_models.token_inputs(batch=4, segment_ids=True)
    model.fit(x, np.array([0, 1, 0, 1]), batch_size=4, epochs=3, verbose=0)
    changed = sorted(v.path for v in model.weights if not np.array_equal(before[v.path], to_numpy(v)))
    assert changed
    for path in changed:
        assert "lora_kernel" in path or path.startswith("logits/"), path
    assert any(path.startswith("logits/") for path in changed)


def test_train_head_false_freezes_head():
    model = tiny_models.bert_classifier()
    report = keras_peft.apply(model, keras_peft.LoRA(rank=2), train_head=False)
    assert report.head_paths == []
    assert all("lora_kernel" in v.path for v in model.trainable_weights)


def test_targets_by_glob_regex_type_and_exclude():
    model = tiny_models.gpt2_causal_lm()
    report = keras_peft.apply(
        model,
        keras_peft.LoRA(rank=2, targets=["*/transformer_layer_1/*/query", re.compile(r".*layer_0/self_attention/key")]),
    )
    (paths,) = report.adapted_paths.values()
    assert paths == [
        "gpt2_backbone/transformer_layer_1/self_attention/query",
        "gpt2_backbone/transformer_layer_0/self_attention/key",
    ]
    keras_peft.remove(model)

    report = keras_peft.apply(
        model,
        keras_peft.LoRA(rank=2, targets=[keras.layers.Dense], exclude=["transformer_layer_0/feedforward_output_dense"]),
    )
    (paths,) = report.adapted_paths.values()
    assert paths == [
        "gpt2_backbone/transformer_layer_0/feedforward_intermediate_dense",
        "gpt2_backbone/transformer_layer_1/feedforward_intermediate_dense",
        "gpt2_backbone/transformer_layer_1/feedforward_output_dense",
    ]


def test_dense_with_activation_adds_update_before_activation():
    model = tiny_models.gpt2_causal_lm()
    block = model.backbone.transformer_layers[0]
    dense = block._feedforward_intermediate_dense
    activation = dense.activation
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["ffn_intermediate"]))
    wrapper = block._feedforward_intermediate_dense
    set_lora_weights(model, seed=2)
    pre_activation = x @ to_numpy(dense.kernel) + to_numpy(dense.bias)
    pre_activation += (x @ to_numpy(wrapper.lora_kernel_a)) @ to_numpy(wrapper.lora_kernel_b)
    assert wrapper.activation is activation
    assert dense.activation is None
    expected = to_numpy(activation(pre_activation))
    np.testing.assert_allclose(to_numpy(wrapper(x)), expected, atol=1e-5)
    keras_peft.remove(model)
    assert block._feedforward_intermediate_dense is dense
    assert dense.activation is activation


def test_user_functional_model_top_level_layer():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(2, name="out")(hidden)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    before = to_numpy(model(x))
    report = keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["hidden"]))
    assert report.adapted_paths[repr(keras_peft.LoRA(rank=2, targets=["hidden"]))] == ["hidden"]
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    set_lora_weights(model, seed=4, scale=1.0)
    assert not np.allclose(to_numpy(model(x)), before)
    keras_peft.remove(model)
    np.testing.assert_array_equal(to_numpy(model(x)), before)


def test_user_subclassed_model():
    class TwoLayers(keras.Model):
        def __init__(self):
            super().__init__()
            self.first = keras.layers.Dense(6, name="first")
            self.second = keras.layers.Dense(2, name="second")

        def call(self, x):
            return self.second(self.first(x))

    model = TwoLayers()
    x = np.ones((2, 3), "float32")
    before = to_numpy(model(x))
    keras_peft.apply(model, keras_peft.LoRA(rank=1, targets=["first", "second"]))
    assert isinstance(model.first, LoRADense)
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    assert {v.name for v in model.trainable_weights} == {"lora_kernel_a", "lora_kernel_b"}


# Bad input: each must raise before changing anything.


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"rank": 0}, "`rank` must be a positive integer"),
        ({"rank": -4}, "`rank` must be a positive integer"),
        ({"rank": 2.5}, "`rank` must be a positive integer"),
        ({"rank": True}, "`rank` must be a positive integer"),
        ({"alpha": 0}, "`alpha` must be a finite number greater than 0"),
        ({"alpha": -1}, "`alpha` must be a finite number greater than 0"),
        ({"dropout": 1.0}, r"`dropout` must be a number in \[0, 1\)"),
        ({"dropout": -0.5}, r"`dropout` must be a number in \[0, 1\)"),
        ({"targets": []}, "`targets` must name at least one layer"),
    ],
)
def test_invalid_method_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        keras_peft.LoRA(**kwargs)


@pytest.mark.parametrize("targets", [[3], [None], [""], 5, [keras.ops.add]])
def test_invalid_target_types(targets):
    with pytest.raises(TypeError, match="targets"):
        keras_peft.LoRA(targets=targets)


def test_target_matching_nothing_lists_paths_and_leaves_model():
    model = tiny_models.gpt2_causal_lm()
    state = model_state(model)
    with pytest.raises(ValueError, match="matched no layer") as error:
        keras_peft.apply(model, keras_peft.LoRA(targets=["query", "no_such_layer"]))
    assert "gpt2_backbone/transformer_layer_0/self_attention/query" in str(error.value)
    assert model_state(model) == state
    assert keras_peft.core.session.get_state(model) is None


def test_role_missing_in_family_is_reported():
    # T5 has no query role name collision, but its attention output projection exists;
    # GPT-2 has no gate projection.
    model = tiny_models.gpt2_causal_lm()
    with pytest.raises(ValueError, match="'ffn_gate' is a role name"):
        keras_peft.apply(model, keras_peft.LoRA(targets=["ffn_gate"]))


def test_target_of_wrong_layer_type():
    model = tiny_models.gpt2_causal_lm()
    state = model_state(model)
    with pytest.raises(TypeError, match="LayerNormalization"):
        keras_peft.apply(model, keras_peft.LoRA(targets=["self_attention_layer_norm"]))
    assert model_state(model) == state


def test_applying_twice_to_same_layer():
    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["query"]))
    set_lora_weights(model, seed=5)
    state = model_state(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        keras_peft.apply(model, keras_peft.LoRA(rank=4, targets=["query", "value"]))
    assert model_state(model) == state


def test_two_methods_on_same_path_in_one_call():
    model = tiny_models.gpt2_causal_lm()
    state = model_state(model)
    with pytest.raises(ValueError, match="would be changed twice"):
        keras_peft.apply(model, keras_peft.LoRA(targets=["query"]), keras_peft.LoRA(targets=["*/query"]))
    assert model_state(model) == state


def test_merge_and_remove_without_apply():
    model = tiny_models.gpt2_causal_lm()
    with pytest.raises(ValueError, match="needs a model with keras_peft methods applied"):
        keras_peft.merge(model)
    with pytest.raises(ValueError, match="needs a model with keras_peft methods applied"):
        keras_peft.remove(model)


def test_apply_rejects_non_models_and_non_methods():
    with pytest.raises(TypeError, match="expects a keras.Model"):
        keras_peft.apply(keras.layers.Dense(2), keras_peft.LoRA())
    model = tiny_models.gpt2_causal_lm()
    with pytest.raises(TypeError, match="takes method objects"):
        keras_peft.apply(model, "lora")
    with pytest.raises(ValueError, match="needs at least one method"):
        keras_peft.apply(model)


def test_apply_rejects_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="is not built"):
        keras_peft.apply(model, keras_peft.LoRA(targets=[keras.layers.Dense]))


def _tiny(name):
    import keras_hub

    common = {"vocabulary_size": 64, "num_layers": 1, "hidden_dim": 16, "intermediate_dim": 32}
    builders = {
        "opt": lambda: keras_hub.models.OPTBackbone(num_heads=2, max_sequence_length=16, **common),
        "mistral": lambda: keras_hub.models.MistralBackbone(num_query_heads=4, num_key_value_heads=2, **common),
        "qwen": lambda: keras_hub.models.QwenBackbone(num_query_heads=4, num_key_value_heads=2, **common),
        "t5": lambda: keras_hub.models.T5Backbone(num_heads=2, **common),
    }
    return builders[name]()


@pytest.mark.parametrize(
    "family,expected",
    [
        ("opt", ["transformer_layer_0/self_attention/query", "transformer_layer_0/self_attention/value"]),
        ("mistral", ["transformer_layer_0/self_attention/query", "transformer_layer_0/self_attention/value"]),
        ("qwen", ["transformer_layer_0/self_attention/query", "transformer_layer_0/self_attention/value"]),
        (
            "t5",
            [
                "transformer_encoder_layer_0/self_attention/query_projector",
                "transformer_decoder_layer_0/self_attention/query_projector",
                "transformer_decoder_layer_0/cross_attention/query_projector",
                "transformer_encoder_layer_0/self_attention/value_projector",
                "transformer_decoder_layer_0/self_attention/value_projector",
                "transformer_decoder_layer_0/cross_attention/value_projector",
            ],
        ),
    ],
)
def test_query_value_roles_on_more_families(family, expected):
    backbone = _tiny(family)
    report = keras_peft.apply(backbone, keras_peft.LoRA(rank=2))
    (paths,) = report.adapted_paths.values()
    assert sorted(paths) == sorted(expected)


def test_generate_follows_adapter_updates():
    # On JAX, generate compiles with the task's tracked variables; adapter
    # variables must be among them or later assignments would be ignored.
    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(rank=4, targets=["query", "value", "attention_output"]))
    model.compile(sampler="greedy")
    prompt = tiny_models.token_inputs()
    prompt["padding_mask"][:, 3:] = 0
    first = to_numpy(model.generate(prompt, max_length=8, stop_token_ids=None))["token_ids"]
    set_lora_weights(model, seed=8, scale=3.0)
    second = to_numpy(model.generate(prompt, max_length=8, stop_token_ids=None))["token_ids"]
    assert not np.array_equal(first, second)


def test_rank_too_large_for_target_leaves_model():
    model = tiny_models.gpt2_causal_lm()
    state = model_state(model)
    with pytest.raises(ValueError, match="`rank` must be at most"):
        keras_peft.apply(model, keras_peft.LoRA(rank=100))
    assert model_state(model) == state


def test_exclude_removing_every_match():
    model = tiny_models.bert_classifier()
    with pytest.raises(ValueError, match="`exclude` removed all of them"):
        keras_peft.apply(model, keras_peft.LoRA(exclude=["value"]))


@pytest.mark.parametrize("train_head", ["no", None, 1])
def test_invalid_train_head(train_head):
    model = tiny_models.bert_classifier()
    with pytest.raises(TypeError, match="`train_head` must be True or False"):
        keras_peft.apply(model, keras_peft.LoRA(), train_head=train_head)


def test_lora_on_head_not_listed_as_head():
    model = tiny_models.bert_classifier()
    report = keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["logits"]))
    assert report.head_paths == []
    assert sorted(v.name for v in model.trainable_weights) == ["lora_kernel_a", "lora_kernel_b"]


def test_no_match_listing_skips_wrapped_layers():
    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(rank=2))
    with pytest.raises(ValueError, match="matched no layer") as error:
        keras_peft.apply(model, keras_peft.LoRA(targets=["nothing_here"]))
    assert "query/query" not in str(error.value)
