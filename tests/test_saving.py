import json
import os

import numpy as np
import pytest

import keras_peft
import tiny_models
from keras_peft.core import session
from keras_peft.core.paths import LayerIndex
from tiny_models import to_numpy


def model_state(model):
    return {
        "layers": [(e.path, type(e.layer).__name__) for e in LayerIndex(model)],
        "weights": [(v.path, v.trainable, to_numpy(v).tobytes()) for v in model.weights],
    }


def copy_base_weights(source, target):
    """Give `target` the base weights of `source`, as from_preset would."""
    base = [v for v in source.weights if "/lora_" not in v.path]
    for target_variable, source_variable in zip(target.weights, base):
        assert tuple(target_variable.shape) == tuple(source_variable.shape)
        target_variable.assign(source_variable)


@pytest.fixture
def trained_classifier():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.LoRA(rank=2, alpha=4))
    rng = np.random.default_rng(0)
    for variable in model.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def test_round_trip_into_fresh_model(trained_classifier, tmp_path):
    x = tiny_models.token_inputs(segment_ids=True)
    expected = to_numpy(trained_classifier(x))
    keys = keras_peft.save_adapter(trained_classifier, tmp_path / "adapter")
    assert "logits/kernel" in keys
    assert "bert_backbone/transformer_layer_0/self_attention_layer/query/lora_kernel_a" in keys
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = tiny_models.bert_classifier()
    copy_base_weights(trained_classifier, fresh)
    report = keras_peft.load_adapter(fresh, tmp_path / "adapter")
    assert report.trainable_parameters == keras_peft.summary(trained_classifier).trainable_parameters
    # Same weights and the same operations: equal up to float32 rounding.
    np.testing.assert_allclose(to_numpy(fresh(x)), expected, atol=1e-5)


def test_config_contents(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["format"] == "keras_peft.adapter"
    assert config["keras_peft_version"] == keras_peft.__version__
    assert config["base_model"]["class_name"] == "BertTextClassifier"
    assert len(config["base_model"]["fingerprint"]) == 16
    assert config["methods"] == [
        {
            "kind": "lora",
            "config": {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["query", "value"], "exclude": []},
        }
    ]
    assert len(config["adapted_paths"][0]) == 4
    for key in ("keras_version", "backend", "variables"):
        assert key in config


def test_save_overwrites_adapter_but_not_other_files(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path / "a")
    keras_peft.save_adapter(trained_classifier, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already contains other files"):
        keras_peft.save_adapter(trained_classifier, tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "b")) == ["notes.txt"]
    (tmp_path / "c").write_text("a file")
    with pytest.raises(FileExistsError, match="is a file"):
        keras_peft.save_adapter(trained_classifier, tmp_path / "c")


def test_save_without_apply(tmp_path):
    with pytest.raises(ValueError, match="needs a model with keras_peft methods applied"):
        keras_peft.save_adapter(tiny_models.bert_classifier(), tmp_path)


def test_load_into_different_architecture(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    other = tiny_models.bert_classifier(num_layers=3)
    before = model_state(other)
    with pytest.raises(keras_peft.AdapterFileError, match="num_layers: saved 2, model 3"):
        keras_peft.load_adapter(other, tmp_path)
    assert model_state(other) == before
    assert session.get_state(other) is None

    gpt2 = tiny_models.gpt2_causal_lm()
    with pytest.raises(keras_peft.AdapterFileError, match="saved from a BertTextClassifier"):
        keras_peft.load_adapter(gpt2, tmp_path)


def test_load_with_different_rank(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["methods"][0]["config"]["rank"] = 4
    config_path.write_text(json.dumps(config))
    fresh = tiny_models.bert_classifier()
    before = model_state(fresh)
    with pytest.raises(keras_peft.AdapterFileError, match=r"shape \(8, 2\) in the adapter file but \(8, 4\)"):
        keras_peft.load_adapter(fresh, tmp_path)
    assert model_state(fresh) == before
    assert session.get_state(fresh) is None


def test_load_into_model_with_lora_of_other_rank(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    fresh = tiny_models.bert_classifier()
    keras_peft.apply(fresh, keras_peft.LoRA(rank=4))
    before = model_state(fresh)
    with pytest.raises(ValueError, match="already has LoRA"):
        keras_peft.load_adapter(fresh, tmp_path)
    assert model_state(fresh) == before


def test_missing_folder_and_files(tmp_path):
    model = tiny_models.bert_classifier()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        keras_peft.load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        keras_peft.load_adapter(model, tmp_path)
    assert session.get_state(model) is None


def test_config_not_json(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    fresh = tiny_models.bert_classifier()
    before = model_state(fresh)
    with pytest.raises(keras_peft.AdapterFileError, match="is not valid JSON"):
        keras_peft.load_adapter(fresh, tmp_path)
    assert model_state(fresh) == before


def test_config_of_another_format(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(keras_peft.AdapterFileError, match="is not a keras_peft adapter config"):
        keras_peft.load_adapter(tiny_models.bert_classifier(), tmp_path)


def test_unknown_method_kind(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["methods"][0]["kind"] = "no_such_method"
    config_path.write_text(json.dumps(config))
    with pytest.raises(keras_peft.AdapterFileError, match="Unknown method kind 'no_such_method'"):
        keras_peft.load_adapter(tiny_models.bert_classifier(), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_safetensors(trained_classifier, tmp_path, damage):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00\xff" * 64)
    else:
        weights.write_bytes(b"")
    fresh = tiny_models.bert_classifier()
    before = model_state(fresh)
    with pytest.raises(keras_peft.AdapterFileError, match="truncated or corrupted"):
        keras_peft.load_adapter(fresh, tmp_path)
    assert model_state(fresh) == before


def test_missing_tensor_in_file(trained_classifier, tmp_path):
    import safetensors.numpy

    keras_peft.save_adapter(trained_classifier, tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    del tensors["logits/bias"]
    safetensors.numpy.save_file(tensors, path)
    fresh = tiny_models.bert_classifier()
    before = model_state(fresh)
    with pytest.raises(keras_peft.AdapterFileError, match="missing from the file: \\['logits/bias'\\]"):
        keras_peft.load_adapter(fresh, tmp_path)
    assert model_state(fresh) == before


def test_target_objects_cannot_be_saved(tmp_path):
    import re

    model = tiny_models.gpt2_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(targets=[re.compile(r".*/query")]))
    with pytest.raises(TypeError, match="cannot be written to an adapter file"):
        keras_peft.save_adapter(model, tmp_path / "a")
    assert not os.path.exists(tmp_path / "a")


def test_causal_lm_round_trip(tmp_path):
    model = tiny_models.llama_causal_lm()
    keras_peft.apply(model, keras_peft.LoRA(rank=2, targets=["query", "key", "value", "attention_output"]))
    rng = np.random.default_rng(1)
    for variable in model.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    x = tiny_models.token_inputs()
    expected = to_numpy(model(x))
    keras_peft.save_adapter(model, tmp_path)
    fresh = tiny_models.llama_causal_lm()
    copy_base_weights(model, fresh)
    report = keras_peft.load_adapter(fresh, tmp_path)
    assert report.head_paths == []
    np.testing.assert_allclose(to_numpy(fresh(x)), expected, atol=1e-5)


def _rewrite_tensor(folder, key, transform):
    import safetensors.numpy

    path = str(folder / "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    tensors[key] = transform(tensors[key])
    safetensors.numpy.save_file(tensors, path)


@pytest.mark.parametrize(
    "transform,fragment",
    [
        (lambda a: (a * 100).astype("int32"), "has dtype int32"),
        (lambda a: np.full_like(a, np.nan), "NaN or infinite"),
        (lambda a: np.full_like(a, np.inf), "NaN or infinite"),
    ],
)
def test_damaged_tensor_values(trained_classifier, tmp_path, transform, fragment):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    _rewrite_tensor(tmp_path, "logits/kernel", transform)
    fresh = tiny_models.bert_classifier()
    before = model_state(fresh)
    with pytest.raises(keras_peft.AdapterFileError, match=fragment):
        keras_peft.load_adapter(fresh, tmp_path)
    assert model_state(fresh) == before


def test_edited_architecture_is_detected(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model"]["architecture"]["backbone"]["config"]["hidden_dim"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(keras_peft.AdapterFileError, match="was edited or damaged"):
        keras_peft.load_adapter(tiny_models.bert_classifier(), tmp_path)


def test_config_without_methods(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["methods"] = []
    config_path.write_text(json.dumps(config))
    with pytest.raises(keras_peft.AdapterFileError, match="lists no methods"):
        keras_peft.load_adapter(tiny_models.bert_classifier(), tmp_path)


def test_folder_argument_checks(trained_classifier, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        keras_peft.load_adapter(tiny_models.bert_classifier(), tmp_path / "file.txt")
    for folder in (None, "", 3):
        with pytest.raises(TypeError, match="needs a folder path"):
            keras_peft.save_adapter(trained_classifier, folder)
        with pytest.raises(TypeError, match="needs a folder path"):
            keras_peft.load_adapter(tiny_models.bert_classifier(), folder)


def test_load_into_trained_model_names_load_adapter(trained_classifier, tmp_path):
    keras_peft.save_adapter(trained_classifier, tmp_path)
    fresh = tiny_models.bert_classifier()
    fresh.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    fresh.fit(tiny_models.token_inputs(segment_ids=True), np.array([0, 1]), verbose=0)
    with pytest.raises(RuntimeError, match=r"then keras_peft.load_adapter\(...\)"):
        keras_peft.load_adapter(fresh, tmp_path)


def test_saved_files_use_umask_permissions(trained_classifier, tmp_path):
    mask = os.umask(0o022)
    try:
        keras_peft.save_adapter(trained_classifier, tmp_path)
    finally:
        os.umask(mask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644
