import os

import keras
import numpy as np
import pytest

import keras_peft
import tiny_models
from keras_peft.core import session
from keras_peft.core.paths import LayerIndex
from keras_peft.layers import LoRADense
from keras_peft.methods.base import Edit
from keras_peft.methods.base import Method
from tiny_models import to_numpy


def model_state(model):
    return {
        "layers": [(e.path, type(e.layer).__name__) for e in LayerIndex(model)],
        "weights": [(v.path, v.trainable, to_numpy(v).tobytes()) for v in model.weights],
    }


class FailingEdit(Edit):
    def apply(self):
        raise RuntimeError("edit failed on purpose")

    def undo(self):
        raise AssertionError("a failed edit must not be undone")


class FailsAfterLoRA(Method):
    """A real method whose single edit fails, to exercise the rollback."""

    kind = "test_fails_after_lora"

    def plan(self, model, index):
        return [FailingEdit("somewhere/else")]

    def get_config(self):
        return {}


def classification_data(batch=4):
    return tiny_models.token_inputs(batch=batch, segment_ids=True), np.arange(batch) % 2


def test_failed_edit_rolls_back_everything():
    model = tiny_models.bert_classifier()
    before = model_state(model)
    with pytest.raises(RuntimeError, match="edit failed on purpose"):
        keras_peft.apply(model, keras_peft.LoRA(rank=2), FailsAfterLoRA())
    assert model_state(model) == before
    assert session.get_state(model) is None
    x, _ = classification_data()
    model(x)  # still runs


def test_failed_second_apply_keeps_first():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["query"]))
    before = model_state(model)
    with pytest.raises(RuntimeError, match="edit failed on purpose"):
        keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["value"]), FailsAfterLoRA())
    assert model_state(model) == before
    assert len(session.get_state(model).applications) == 1


def test_compiled_but_untrained_model_trains_only_adapter():
    # KerasHub tasks compile themselves in __init__, so this is the common case.
    model = tiny_models.bert_classifier()
    assert model.compiled
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    keras_peft.apply(model, keras_peft.LoRA(rank=2))
    before = {v.path: to_numpy(v).copy() for v in model.weights}
    x, y = classification_data()
    model.fit(x, y, epochs=2, verbose=0)
    changed = [v.path for v in model.weights if not np.array_equal(before[v.path], to_numpy(v))]
    assert changed
    assert all("lora_kernel" in p or p.startswith("logits/") for p in changed), changed


def test_trained_model_is_rejected_unchanged():
    model = tiny_models.bert_classifier()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = classification_data()
    model.fit(x, y, epochs=1, verbose=0)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="already has optimizer state"):
        keras_peft.apply(model, keras_peft.LoRA(rank=2))
    assert model_state(model) == before

    # The documented way out: compile again with a new optimizer, then apply.
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    keras_peft.apply(model, keras_peft.LoRA(rank=2))
    model.fit(x, y, epochs=1, verbose=0)


def test_merge_after_training_clears_compile_state():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.LoRA(rank=2))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = classification_data()
    model.fit(x, y, epochs=1, verbose=0)
    with pytest.warns(keras_peft.KerasPeftWarning, match="compile state was cleared"):
        keras_peft.merge(model)
    assert not model.compiled
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)


def test_remove_restores_layers_flags_and_outputs():
    model = tiny_models.gpt2_causal_lm()
    x = tiny_models.token_inputs()
    before = model_state(model)
    outputs = to_numpy(model(x))
    keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["query", "value", "ffn_output"]))
    for variable in model.trainable_weights:
        variable.assign(np.ones(variable.shape, "float32"))
    keras_peft.remove(model)
    assert model_state(model) == before
    np.testing.assert_array_equal(to_numpy(model(x)), outputs)
    assert session.get_state(model) is None


def test_save_raises_until_merged(tmp_path):
    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(rank=2))
    for variable in model.trainable_weights:
        variable.assign(np.full(variable.shape, 0.2, "float32"))
    x = tiny_models.token_inputs()
    expected = to_numpy(model(x))
    path = str(tmp_path / "model.keras")
    with pytest.raises(keras_peft.UnsavedAdapterError, match="keras_peft.save_adapter"):
        model.save(path)
    assert not os.path.exists(path)
    with pytest.raises(keras_peft.UnsavedAdapterError, match="keras_peft.merge"):
        model.backbone.save_to_preset(str(tmp_path / "preset"))
    assert not os.path.exists(tmp_path / "preset")

    keras_peft.merge(model)
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(restored(x)), expected, atol=1e-5)


def test_merged_backbone_preset_loads_without_keras_peft(tmp_path):
    backbone = tiny_models.gpt2_backbone()
    keras_peft.apply(backbone, keras_peft.LoRA(rank=2))
    for variable in backbone.trainable_weights:
        variable.assign(np.full(variable.shape, 0.1, "float32"))
    x = tiny_models.token_inputs()
    expected = to_numpy(backbone(x))
    keras_peft.merge(backbone)
    backbone.save_to_preset(str(tmp_path / "preset"))
    import keras_hub

    restored = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset"))
    assert not any(isinstance(e.layer, LoRADense) for e in LayerIndex(restored))
    np.testing.assert_allclose(to_numpy(restored(x)), expected, atol=1e-5)


def test_save_weights_of_patched_model_round_trips(tmp_path):
    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(rank=2))
    for variable in model.trainable_weights:
        variable.assign(np.full(variable.shape, 0.3, "float32"))
    x = tiny_models.token_inputs()
    expected = to_numpy(model(x))
    path = str(tmp_path / "patched.weights.h5")
    model.save_weights(path)

    other = tiny_models.gpt2_causal_lm()
    keras_peft.apply(other, keras_peft.LoRA(rank=2))
    other.load_weights(path)
    np.testing.assert_allclose(to_numpy(other(x)), expected, atol=1e-6)


def test_summary_report_lists_trainable_variables():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["query"]))
    report = keras_peft.summary(model)
    assert set(report.trainable_variables) == {
        "bert_backbone/transformer_layer_0/self_attention_layer/query/lora_kernel_a",
        "bert_backbone/transformer_layer_0/self_attention_layer/query/lora_kernel_b",
        "bert_backbone/transformer_layer_1/self_attention_layer/query/lora_kernel_a",
        "bert_backbone/transformer_layer_1/self_attention_layer/query/lora_kernel_b",
        "logits/kernel",
        "logits/bias",
    }
    assert report.trainable_parameters == sum(report.trainable_variables.values())
    assert 0 < report.trainable_fraction < 1
    text = str(report)
    assert "trainable parameters" in text
    assert "logits" in text
