"""Training helpers shared by the example scripts: tokenization and shuffled batches."""

import keras
import keras_hub
import numpy as np
import tensorflow as tf


def tokenize(texts, folder, sequence_length, chunk_size=1024):
    """Tokenize texts once for every run: `{token_ids, segment_ids, padding_mask}` as NumPy arrays."""
    tokenizer = keras_hub.models.BertTokenizer.from_preset(folder)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=sequence_length)
    features = {}
    for start in range(0, len(texts), chunk_size):
        batch = preprocessor(texts[start : start + chunk_size])
        for key, value in batch.items():
            features.setdefault(key, []).append(keras.ops.convert_to_numpy(value))
    return {key: np.concatenate(parts) for key, parts in features.items()}


def shuffled_batches(inputs, labels, batch_size, seed):
    """Return a `tf.data.Dataset` of `(inputs, labels)` batches, reshuffled every epoch.

    KerasHub 0.32 tasks turn NumPy arrays or a list of strings passed to `fit`
    into a `tf.data` pipeline without shuffling (on every backend), so the
    shuffle happens here. KerasHub tasks accept `tf.data` input on every backend.
    """
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels))
    dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size)
