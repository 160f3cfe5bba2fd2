"""The `LoRA` method: wrap targeted `Dense`/`EinsumDense` layers in `LoRADense`."""

import keras

from keras_peft.core.targets import check_targets
from keras_peft.core.targets import describe_target
from keras_peft.core.targets import match_targets
from keras_peft.core.targets import no_match_message
from keras_peft.core.validation import check_alpha
from keras_peft.core.validation import check_dropout
from keras_peft.core.validation import check_rank
from keras_peft.core.wrap import WrapEdit
from keras_peft.layers.lora_dense import LoRADense
from keras_peft.methods.base import Method
from keras_peft.methods.base import register_method


def inside_wrapper(index, entry):
    """Whether `entry` is a layer held by a keras_peft wrapper (its base layer)."""
    parent = entry.parent
    return parent is not None and getattr(parent, "_keras_peft_wrapper", False)


@register_method
class LoRA(Method):
    """Low-rank adaptation of the targeted projections.

    Every matched `Dense` or `EinsumDense` layer is wrapped in a
    `keras_peft.layers.LoRADense` computing
    `y = W x + (alpha / rank) · B A x` with B = 0 at start, and only A and B
    train (plus a task head, see `keras_peft.apply`).

    Args:
        rank: int > 0. Defaults to `8`.
        alpha: float > 0, scale numerator. Defaults to `None` (= `rank`).
        dropout: float in [0, 1) on the LoRA input. Defaults to `0.0`.
        targets: what to adapt; see `keras_peft.core.targets` for the forms
            (role names, paths, globs, compiled regular expressions, layer
            classes). Defaults to `("query", "value")`, the query and value
            projections of every attention layer. Each target must match at
            least one layer.
        exclude: targets to leave out, in the same forms. Defaults to `()`.

    Example:

    >>> method = LoRA(rank=8, alpha=16, targets=["query", "value"])
    >>> method.get_config()["rank"]
    8
    """

    kind = "lora"

    def __init__(self, rank=8, alpha=None, dropout=0.0, targets=("query", "value"), exclude=()):
        check_rank(rank)
        alpha = float(rank) if alpha is None else alpha
        check_alpha(alpha)
        check_dropout(dropout)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.targets = check_targets(targets, "targets")
        if not self.targets:
            raise ValueError("`targets` must name at least one layer. Received: targets=[]")
        self.exclude = check_targets(exclude, "exclude")

    def get_config(self):
        for target in self.targets + self.exclude:
            if not isinstance(target, str):
                raise TypeError(
                    f"LoRA target {describe_target(target)} is not a string, so it "
                    "cannot be written to an adapter file. Use path strings or role "
                    "names in targets and exclude to save the adapter."
                )
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "exclude": list(self.exclude),
        }

    def __repr__(self):
        return (
            f"LoRA(rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, "
            f"targets={list(self.targets)!r}, exclude={list(self.exclude)!r})"
        )

    def plan(self, model, index):
        matches = match_targets(index, self.targets, self.exclude, skip=lambda e: inside_wrapper(index, e))
        edits = []
        planned = set()
        for target, entries in matches.items():
            if not entries:
                unfiltered = match_targets(index, [target], skip=lambda e: inside_wrapper(index, e))[target]
                if unfiltered and self.exclude:
                    raise ValueError(
                        f"LoRA target {describe_target(target)} matched "
                        f"{len(unfiltered)} layer(s), but `exclude` removed all of them "
                        f"(for example {unfiltered[0].path!r}). Drop the target or narrow "
                        f"`exclude`. Received: exclude={list(self.exclude)!r}"
                    )
                raise ValueError(no_match_message(target, index, "LoRA"))
            for entry in entries:
                if id(entry.layer) in planned:
                    continue
                self._check_layer(entry, target)
                planned.add(id(entry.layer))
                edits.append(self._edit(entry))
        return edits

    def _check_layer(self, entry, target):
        layer = entry.layer
        if isinstance(layer, LoRADense):
            raise ValueError(
                f"Layer {entry.path!r} already has LoRA. Call keras_peft.remove(model) "
                "or keras_peft.merge(model) before applying LoRA to it again."
            )
        if getattr(layer, "_keras_peft_wrapper", False):
            raise ValueError(
                f"Layer {entry.path!r} is already wrapped by another keras_peft method "
                f"({type(layer).__name__}); one layer takes one wrapper. Exclude the "
                "path, or call keras_peft.remove(model) first."
            )
        if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            raise TypeError(
                f"LoRA adapts Dense and EinsumDense layers, but target "
                f"{describe_target(target)} matched {entry.path!r}, a "
                f"{type(layer).__name__}. Narrow the target or add the path to `exclude`."
            )
        if not layer.built:
            raise ValueError(
                f"Layer {entry.path!r} is not built. Build the model (call it once "
                "on data) before applying LoRA."
            )
        if "." in getattr(layer, "equation", ""):
            raise NotImplementedError(
                f"LoRA does not support the EinsumDense equation {layer.equation!r} at "
                f"{entry.path!r} (an ellipsis in the kernel)."
            )

    def _edit(self, entry):
        def make_wrapper(layer):
            return LoRADense(layer, rank=self.rank, alpha=self.alpha, dropout=self.dropout)

        return WrapEdit(
            path=entry.path,
            parent=entry.parent,
            layer=entry.layer,
            make_wrapper=make_wrapper,
            trainable_names=("lora_kernel_a", "lora_kernel_b"),
        )
