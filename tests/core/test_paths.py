import keras

import keras_peft
import tiny_models
from keras_peft.core.paths import LayerIndex


def test_paths_equal_across_instances():
    # Keras numbers automatic names per process (gpt2_backbone, gpt2_backbone_1, ...);
    # canonical paths must not depend on that.
    first = tiny_models.gpt2_causal_lm()
    second = tiny_models.gpt2_causal_lm()
    assert first.backbone.name != second.backbone.name
    assert LayerIndex(first).paths() == LayerIndex(second).paths()
    assert "gpt2_backbone/transformer_layer_0/self_attention/query" in LayerIndex(first).paths()


def test_generated_names_are_numbered_by_position():
    def build():
        inputs = keras.Input((3,))
        x = keras.layers.Dense(4)(inputs)
        x = keras.layers.Dense(4, name="middle")(x)
        return keras.Model(inputs, keras.layers.Dense(2)(x))

    first, second = build(), build()
    assert LayerIndex(first).paths() == ["dense", "middle", "dense_1"]
    assert LayerIndex(second).paths() == LayerIndex(first).paths()


def test_wrapped_layer_keeps_its_path():
    model = tiny_models.gpt2_causal_lm()
    paths = LayerIndex(model).paths()
    keras_peft.apply(model, keras_peft.LoRA(rank=2))
    index = LayerIndex(model)
    wrapped = "gpt2_backbone/transformer_layer_0/self_attention/query"
    assert type(index.get(wrapped).layer).__name__ == "LoRADense"
    assert index.get(wrapped + "/query").layer.name == "query"
    # Every original path still exists; the only new ones are inside wrappers.
    assert set(paths) <= set(index.paths())
    for path in set(index.paths()) - set(paths):
        assert path.endswith("/query/query") or path.endswith("/value/value"), path


def test_owned_variables_exclude_sublayers():
    model = tiny_models.bert_classifier()
    index = LayerIndex(model)
    attention = index.get("bert_backbone/transformer_layer_0/self_attention_layer")
    assert index.owned_variables(attention) == []
    query = index.get("bert_backbone/transformer_layer_0/self_attention_layer/query")
    assert sorted(v.name for v in index.owned_variables(query)) == ["bias", "kernel"]
