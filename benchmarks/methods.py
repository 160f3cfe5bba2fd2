"""The training configurations that the benchmarks compare.

Each entry of `METHODS` is one way to fine-tune the same model. A new
keras_peft method is one more `PeftMethod` entry: it is measured whenever
its class is in `keras_peft.__all__` and skipped otherwise, so the table can
name methods before they exist.
"""

import dataclasses
import math


def count_parameters(variables):
    return int(sum(math.prod(v.shape) for v in variables))


def first_attention(backbone):
    """Return the self-attention layer of the first transformer block."""
    return backbone.transformer_layers[0]._self_attention_layer


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A configuration that does not use keras_peft.

    Attributes:
        name: the key used on the command line and in tables.
        description: one line for the report.
        changes_forward: whether the forward pass differs from the base model's.
    """

    name: str
    description: str
    changes_forward: bool = False

    def available(self):
        return True

    def apply(self, model):
        if self.name == "full":
            return
        if self.name == "keras_lora":
            # KerasHub's own LoRA: freezes the backbone and calls enable_lora
            # on every layer named query/value (their biases train too).
            model.backbone.enable_lora(rank=8)
            return
        if self.name == "limit":
            apply_limit(model)
            return
        raise ValueError(f"Unknown baseline {self.name!r}.")


@dataclasses.dataclass(frozen=True)
class PeftMethod:
    """A keras_peft method applied with `keras_peft.apply(model, cls(**kwargs))`.

    Attributes:
        name: the key used on the command line and in tables.
        class_name: the name of the method class in `keras_peft`.
        kwargs: constructor arguments.
        description: one line for the report.
        changes_forward: whether the adapted model computes more than the
            base model in its forward pass, so inference is measured too.
    """

    name: str
    class_name: str
    kwargs: dict
    description: str
    changes_forward: bool = True

    def available(self):
        import keras_peft

        return self.class_name in keras_peft.__all__

    def make(self):
        import keras_peft

        return getattr(keras_peft, self.class_name)(**self.kwargs)

    def apply(self, model):
        import keras_peft

        keras_peft.apply(model, self.make())


def apply_limit(model):
    """Freeze every weight except the query and value biases of the first block.

    Gradients then flow back through the activations of every block (as for
    any method that trains something in the first block), but almost no
    parameter trains: this is the cost floor of a PEFT training step. A
    task head outside the backbone stays trainable, as with keras_peft.
    """
    backbone = model.backbone
    for variable in model.weights:
        variable.trainable = False
    attention = first_attention(backbone)
    attention._query_dense.bias.trainable = True
    attention._value_dense.bias.trainable = True
    backbone_ids = {id(v) for v in backbone.weights}
    for variable in model.weights:
        if id(variable) not in backbone_ids:
            variable.trainable = True


METHODS = [
    Baseline("full", "full fine-tuning: every weight trains"),
    Baseline("keras_lora", "Keras' own `backbone.enable_lora(rank=8)` (query and value)"),
    PeftMethod(
        "lora",
        "LoRA",
        {"rank": 8, "targets": ["query", "value"]},
        "keras_peft LoRA, rank 8, query and value",
    ),
    PeftMethod("adapter", "Adapter", {}, "keras_peft Adapter, default arguments"),
    PeftMethod(
        "bias_only", "BiasOnly", {}, "keras_peft BiasOnly (BitFit), default arguments", changes_forward=False
    ),
    PeftMethod(
        "diff",
        "DiffTuning",
        {"epsilon": 0.05, "penalty": 1e-4},
        "keras_peft DiffTuning(epsilon=0.05, penalty=1e-4), default components",
        changes_forward=False,
    ),
    # NOTE: the prompt and prefix entries guess the argument name; check it
    # when those methods land.
    PeftMethod("prompt", "PromptTuning", {"num_virtual_tokens": 16}, "keras_peft PromptTuning, 16 tokens"),
    PeftMethod("prefix", "PrefixTuning", {"num_virtual_tokens": 16}, "keras_peft PrefixTuning, 16 positions"),
    Baseline("limit", "lower bound: only the first block's query and value biases train"),
]
METHODS_BY_NAME = {method.name: method for method in METHODS}


def available_methods(public_names=None):
    """Return the names of the methods that can run with the installed keras_peft.

    `public_names` is `keras_peft.__all__`; by default it is read by importing
    keras_peft in this process.
    """
    if public_names is None:
        import keras_peft

        public_names = keras_peft.__all__
    return [
        method.name
        for method in METHODS
        if not isinstance(method, PeftMethod) or method.class_name in public_names
    ]
