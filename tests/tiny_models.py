"""Tiny KerasHub models built from constructor arguments, for fast tests.

Dropout is 0 everywhere so that outputs are deterministic. Each builder
returns a fresh model with new random weights.
"""

import keras
import keras_hub
import numpy as np

VOCABULARY_SIZE = 64
SEQUENCE_LENGTH = 8


def bert_backbone(num_layers=2):
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        dropout=0.0,
        max_sequence_length=32,
    )


def bert_classifier(num_classes=2, num_layers=2):
    return keras_hub.models.BertTextClassifier(
        backbone=bert_backbone(num_layers), num_classes=num_classes, preprocessor=None, dropout=0.0
    )


def gpt2_backbone(num_layers=2):
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        dropout=0.0,
        max_sequence_length=32,
    )


def gpt2_causal_lm(num_layers=2):
    return keras_hub.models.GPT2CausalLM(backbone=gpt2_backbone(num_layers), preprocessor=None)


def llama_backbone(num_layers=2):
    # Four query heads share two key/value heads (grouped-query attention).
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=num_layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def llama_causal_lm(num_layers=2):
    return keras_hub.models.LlamaCausalLM(backbone=llama_backbone(num_layers), preprocessor=None)


def gemma_backbone(num_layers=2):
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=num_layers,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=4,
    )


def gemma_causal_lm(num_layers=2):
    return keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(num_layers), preprocessor=None)


def bart_backbone(num_layers=2):
    return keras_hub.models.BartBackbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        dropout=0.0,
        max_sequence_length=32,
    )


def bart_seq2seq_lm(num_layers=2):
    return keras_hub.models.BartSeq2SeqLM(backbone=bart_backbone(num_layers), preprocessor=None)


def t5_backbone(num_layers=2):
    return keras_hub.models.T5Backbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        dropout=0.0,
    )


def t5_seq2seq_lm(num_layers=2):
    return keras_hub.models.T5Seq2SeqLM(backbone=t5_backbone(num_layers), preprocessor=None)


def token_inputs(batch=2, length=SEQUENCE_LENGTH, seed=0, segment_ids=False):
    """Random `token_ids` and a full `padding_mask` (optionally `segment_ids`)."""
    rng = np.random.default_rng(seed)
    inputs = {
        "token_ids": rng.integers(1, VOCABULARY_SIZE, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }
    if segment_ids:
        inputs["segment_ids"] = np.zeros((batch, length), "int32")
    return inputs


def seq2seq_inputs(batch=2, length=SEQUENCE_LENGTH, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "encoder_token_ids": rng.integers(1, VOCABULARY_SIZE, (batch, length)).astype("int32"),
        "encoder_padding_mask": np.ones((batch, length), "int32"),
        "decoder_token_ids": rng.integers(1, VOCABULARY_SIZE, (batch, length)).astype("int32"),
        "decoder_padding_mask": np.ones((batch, length), "int32"),
    }


def to_numpy(value):
    """Convert a tensor, or a dict of tensors, to NumPy."""
    if isinstance(value, dict):
        return {key: to_numpy(item) for key, item in value.items()}
    return np.asarray(keras.ops.convert_to_numpy(value))


def snapshot(model):
    """Return `{variable path: value copy}` for every weight of `model`."""
    return {variable.path + f"#{i}": to_numpy(variable).copy() for i, variable in enumerate(model.weights)}
