"""The `DiffTuning` method: train the pretrained weights, but only a little.

Every selected weight W trains, kept near its pretrained value W_0 by a
`DiffConstraint` (after each optimizer step, W is projected back into the
ball ‖W − W_0‖ ≤ ε) and, when `penalty` > 0, a `DiffPenalty` that adds
λ‖W − W_0‖ to the loss. Both are set on the existing variables; no layer
changes.

Adapter files store the differences W − W_0, densely or, with
`save_density` < 1, only the largest entries of each tensor as indices and
values, so an adapter is added to a freshly loaded pretrained model.
"""

import dataclasses
import math
import numbers

import keras
import numpy as np

from keras_peft.constraints import DiffConstraint
from keras_peft.constraints import DiffPenalty
from keras_peft.constraints import check_epsilon
from keras_peft.constraints import check_norm
from keras_peft.constraints import check_strength
# A module import: keras_peft.core.session imports keras_peft.methods.base.
from keras_peft.core import session
from keras_peft.core import step_state
from keras_peft.core.replace import name_scopes
from keras_peft.core.replace import track_variable
from keras_peft.core.targets import check_targets
from keras_peft.errors import AdapterFileError
from keras_peft.hub.components import COMPONENTS
from keras_peft.hub.components import check_components
from keras_peft.hub.components import find_components
from keras_peft.methods.base import Edit
from keras_peft.methods.base import Method
from keras_peft.methods.base import register_method
from keras_peft.methods.base import variable_to_numpy
from keras_peft.methods.bitfit import excluded_layers
from keras_peft.methods.bitfit import originally_trainable
from keras_peft.methods.bitfit import own_variables
from keras_peft.methods.bitfit import select_target_layers
from keras_peft.methods.bitfit import string_targets

DIFF_COMPONENTS = COMPONENTS
# Word embeddings, attention and feed-forward projections with their biases,
# and the layer norms train by default. Position embeddings stay fixed.
DEFAULT_COMPONENTS = tuple(c for c in COMPONENTS if c != "position_embedding")


def check_density(density):
    """Raise `ValueError` unless `density` is a number in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
        raise ValueError(
            "`save_density` must be a number in (0, 1]: the fraction of the "
            "entries of each difference W − W_0 that adapter files keep (1 keeps "
            f"all of them). Received: save_density={density!r}"
        )


def kept_entries(size, density):
    """Return how many of `size` entries a sparse difference keeps at `density`.

    That is ⌈density · size⌉, at least 1; the product is rounded to 6
    decimals first so that, say, 0.3 · 10 keeps 3 entries, not 4.
    """
    return max(1, min(size, math.ceil(round(density * size, 6))))


def index_dtype(size):
    """Return the NumPy dtype of the flat indices into a tensor of `size` entries."""
    return np.int32 if size <= np.iinfo(np.int32).max else np.int64


def sparsify(difference, density):
    """Keep the ⌈density · n⌉ entries of largest magnitude of a difference tensor.

    Returns:
        `(indices, values)`: ascending flat (C order) indices and the entries
        there. No dropped entry is larger in magnitude than the smallest kept
        one. With k of n entries kept, the dropped part r therefore satisfies
        ‖r‖_F ≤ sqrt(1 − k / n) · ‖difference‖_F and ‖r‖_∞ ≤ ‖difference‖_∞.
    """
    flat = np.ravel(difference)
    size = flat.size
    count = kept_entries(size, density)
    if count < size:
        indices = np.argpartition(-np.abs(flat), count - 1)[:count]
        indices.sort()
    else:
        indices = np.arange(size)
    indices = indices.astype(index_dtype(size))
    return indices, flat[indices]


def densify(indices, values, shape):
    """Return the dense difference that `sparsify` stored as indices and values."""
    flat = np.zeros(math.prod(shape), dtype=values.dtype)
    flat[indices] = values
    return flat.reshape(shape)


class DiffEdit(Edit):
    """Put a `DiffConstraint` (and a `DiffPenalty`) on the variables of one layer.

    `apply` copies each variable's current value into a non-trainable
    reference W_0, tracked by the model (so it is saved, moved and passed
    into compiled train steps like the model's other variables), and sets
    the variable's `constraint` and `regularizer`. On JAX it also lets the
    constraint read W_0 inside the train step (see
    `keras_peft.core.step_state`). `undo` puts W_0 back into the variable,
    untracks it and restores the constraint and regularizer. `merge` keeps
    the trained value and drops W_0, the constraint and the penalty.

    Adapter files get `<name>_diff` (the dense difference W − W_0) or, with
    `density` < 1, `<name>_diff_indices` and `<name>_diff_values`.
    """

    exclusive = False

    def __init__(self, model, path, variables, epsilon, penalty, norm, density):
        super().__init__(path)
        self.model = model
        self.variables = dict(variables)
        self.epsilon = epsilon
        self.penalty = penalty
        self.norm = norm
        self.density = density
        self.references = {}
        self._previous = {}

    def apply(self):
        try:
            for name, variable in self.variables.items():
                # The copy gets a path beside the weight's: `.../kernel_pretrained`.
                with name_scopes(variable.path.split("/")[:-1]):
                    # A copy, not the variable's buffer: JAX donates the
                    # buffers of model variables to the jitted train step.
                    reference = keras.Variable(
                        variable_to_numpy(variable),
                        dtype=variable.dtype,
                        trainable=False,
                        autocast=False,
                        name=f"{name}_pretrained",
                    )
                self.references[name] = reference
                track_variable(self.model, reference)
                self._previous[name] = (variable.constraint, variable.regularizer)
                variable.constraint = DiffConstraint(reference, self.epsilon, self.norm)
                if self.penalty > 0:
                    variable.regularizer = DiffPenalty(reference, self.penalty, self.norm)
            step_state.watch(self.model, self.references.values())
        except BaseException:
            self._release(restore_values=False)
            raise

    def _release(self, restore_values):
        step_state.unwatch(self.model, self.references.values())
        for name, variable in self.variables.items():
            if name not in self.references:
                continue
            reference = self.references[name]
            if restore_values:
                variable.assign(reference)
            if name in self._previous:
                variable.constraint, variable.regularizer = self._previous.pop(name)
            self.model._untrack_variable(reference)
        self.references = {}

    def reference_variables(self):
        return list(self.references.values())

    def undo(self):
        self._release(restore_values=True)

    def merge(self):
        self._release(restore_values=False)

    def trainable_variables(self):
        return list(self.variables.values())

    def differences(self):
        """Return `{name: W − W_0}` as NumPy arrays."""
        return {
            name: variable_to_numpy(variable) - variable_to_numpy(self.references[name])
            for name, variable in self.variables.items()
        }

    def export_tensors(self):
        tensors = {}
        for name, difference in self.differences().items():
            if self.density == 1:
                tensors[f"{name}_diff"] = difference
            else:
                indices, values = sparsify(difference, self.density)
                tensors[f"{name}_diff_indices"] = indices
                tensors[f"{name}_diff_values"] = values
        return tensors

    def expected_shapes(self):
        shapes = {}
        for name, variable in self.variables.items():
            shape = tuple(variable.shape)
            if self.density == 1:
                shapes[f"{name}_diff"] = shape
            else:
                count = kept_entries(math.prod(shape), self.density)
                shapes[f"{name}_diff_indices"] = (count,)
                shapes[f"{name}_diff_values"] = (count,)
        return shapes

    def import_tensors(self, tensors):
        # Rebuild every difference first, so a bad file changes no variable.
        differences = {}
        for name, variable in self.variables.items():
            shape = tuple(variable.shape)
            if self.density == 1:
                differences[name] = tensors[f"{name}_diff"]
                continue
            indices = tensors[f"{name}_diff_indices"]
            if indices.size and (indices.min() < 0 or indices.max() >= math.prod(shape)):
                raise AdapterFileError(
                    f"The sparse difference {self.path}/{name}_diff_indices has indices "
                    f"outside a tensor of shape {shape}; the adapter file is corrupted."
                )
            if indices.size > 1 and not np.all(np.diff(indices.astype(np.int64)) > 0):
                raise AdapterFileError(
                    f"The sparse difference {self.path}/{name}_diff_indices is not strictly "
                    "ascending (repeated or unordered indices); the adapter file is corrupted."
                )
            differences[name] = densify(indices, tensors[f"{name}_diff_values"], shape)
        for name, difference in differences.items():
            flat = np.asarray(difference, np.float64).ravel()
            distance = np.abs(flat).max(initial=0.0) if self.norm == "linf" else np.sqrt(np.sum(flat**2))
            # W - W_0 recomputed in float32 can exceed epsilon by rounding; 1%
            # leaves room for that and still catches edited files.
            if distance > self.epsilon * 1.01 + 1e-5:
                raise AdapterFileError(
                    f"The difference {self.path}/{name} has {self.norm} norm {distance:.6g}, "
                    f"above the method's epsilon {self.epsilon:g}, so no training with this "
                    "configuration produced it; the adapter file was edited or damaged."
                )
        for name, variable in self.variables.items():
            reference = variable_to_numpy(self.references[name])
            variable.assign(reference + differences[name].astype(reference.dtype))


@register_method
class DiffTuning(Method):
    """Diff tuning: train the pretrained weights within a small distance of W_0.

    Each selected weight W trains from its pretrained value W_0. After every
    optimizer step a `keras_peft.constraints.DiffConstraint` projects it back
    into the ball ‖W − W_0‖ ≤ ε (one ball per tensor), and with λ > 0 a
    `keras_peft.constraints.DiffPenalty` adds λ‖W − W_0‖ to the loss, which
    is the objective min_Δ L(θ_0 + Δ) + λ‖Δ‖ subject to ‖Δ‖ ≤ ε. At start
    W = W_0, so the model computes exactly what the pretrained model
    computes. By default these weights train:

    | component | weights |
    |---|---|
    | `token_embedding` | the word embeddings W_e |
    | `query`, `key`, `value` | W_Q, W_K, W_V and their biases, in self- and cross-attention |
    | `attention_output`, `cross_attention_output` | W_O and b_O |
    | `ffn_intermediate`, `ffn_gate`, `ffn_output` | W_1, b_1, W_2, b_2 (and a gate) |
    | `layer_norm` | γ and β (the scale of RMS norms) |

    Position embeddings stay fixed unless `"position_embedding"` is named in
    `components`; other weights (segment embeddings, a pooler) stay frozen.
    A KerasHub task's head trains freely, as with every method.

    Memory: W_0 is one more copy of every selected weight, a non-trainable
    variable that the model tracks (`<name>_pretrained`, with no optimizer
    state), and the optimizer keeps its state for every selected
    weight, as in full fine-tuning. What diff tuning
    saves is the adapter size: `save_density` < 1 keeps only the largest
    entries of each difference.

    `keras_peft.remove` puts W_0 back; `keras_peft.merge` keeps the trained
    weights and drops W_0, the constraints and the penalties, leaving a
    plain model.

    Args:
        epsilon: float > 0, the radius ε of the ball around W_0, per tensor.
        penalty: float ≥ 0, the factor λ of the penalty λ‖W − W_0‖ per
            tensor. Defaults to `0.0` (no penalty).
        norm: `"l2"` (Frobenius norm of the whole tensor) or `"linf"`
            (largest absolute entry), for the ball and the penalty.
            Defaults to `"l2"`.
        components: component names to train, from `"token_embedding"`,
            `"position_embedding"`, `"query"`, `"key"`, `"value"`,
            `"attention_output"`, `"cross_attention_output"`,
            `"ffn_intermediate"`, `"ffn_gate"`, `"ffn_output"` and
            `"layer_norm"`. Each named component must exist in the model.
            Defaults to `None`: the table above, skipping components the
            model lacks.
        targets: further layers whose trainable variables are diff-tuned, in
            the forms of `keras_peft.core.targets`. Defaults to `()`.
        exclude: layers to leave frozen, in the same forms. Defaults to `()`.
        save_density: float in (0, 1], the fraction of the entries of each
            difference W − W_0 that `keras_peft.save_adapter` keeps: the
            ⌈density · n⌉ entries of largest magnitude, stored as int32 flat
            indices and values. That is 8 bytes per kept entry against 4 per
            entry of a dense float32 difference, so the file is smaller below
            a density of 0.5. Defaults to `1.0`, the dense difference. When k
            of a tensor's n entries are kept, the dropped remainder r satisfies
            ‖r‖_F ≤ sqrt(1 − k / n) · ‖W − W_0‖_F.

    Example:

    >>> method = DiffTuning(epsilon=0.05, penalty=1e-4, save_density=0.1)
    >>> method.get_config()["norm"]
    'l2'

    References:
        Guo, Rush and Kim, "Parameter-Efficient Transfer Learning with Diff
        Pruning", ACL 2021.
    """

    kind = "diff"

    def __init__(
        self,
        epsilon,
        penalty=0.0,
        norm="l2",
        components=None,
        targets=(),
        exclude=(),
        save_density=1.0,
    ):
        check_epsilon(epsilon)
        check_strength(penalty, "penalty")
        check_norm(norm)
        check_density(save_density)
        if components is not None:
            components = check_components(components, DIFF_COMPONENTS)
        self.epsilon = float(epsilon)
        self.penalty = float(penalty)
        self.norm = norm
        self.components = components
        self.targets = check_targets(targets, "targets")
        self.exclude = check_targets(exclude, "exclude")
        self.save_density = float(save_density)
        if components == () and not self.targets:
            raise ValueError(
                "DiffTuning needs something to train: name components, or layer "
                "targets. Received: components=[] and targets=[]"
            )

    def selected_components(self):
        """Return the component names this method diff-tunes."""
        return DEFAULT_COMPONENTS if self.components is None else self.components

    def get_config(self):
        return {
            "epsilon": self.epsilon,
            "penalty": self.penalty,
            "norm": self.norm,
            "components": None if self.components is None else list(self.components),
            "targets": string_targets("DiffTuning", self.targets),
            "exclude": string_targets("DiffTuning", self.exclude),
            "save_density": self.save_density,
        }

    def __repr__(self):
        components = None if self.components is None else list(self.components)
        return (
            f"DiffTuning(epsilon={self.epsilon}, penalty={self.penalty}, norm={self.norm!r}, "
            f"components={components!r}, targets={list(self.targets)!r}, "
            f"exclude={list(self.exclude)!r}, save_density={self.save_density})"
        )

    def plan(self, model, index):
        head_layers = [entry.layer for entry in session.task_head_entries(model, index)]
        excluded = excluded_layers(index, self.exclude)
        found = find_components(index, self.selected_components(), skip=head_layers + excluded)
        found["targets"] = select_target_layers(index, self.targets, self.exclude, "DiffTuning")

        if self.components is not None:
            missing = [c for c in self.components if not found.get(c)]
            if missing:
                raise ValueError(
                    f"DiffTuning: model {model.name!r} has no layer in the component(s) "
                    f"{missing}. Leave them out of `components`, or pass components=None "
                    "for the default selection, which skips components a model lacks."
                )

        selected = {}  # path -> {name: variable}
        claimed = set()
        for layers in found.values():
            for item in layers:
                for variable in own_variables(item.layer):
                    if id(variable) in claimed or not originally_trainable(model, variable):
                        continue
                    self._check_variable(item.path, variable)
                    claimed.add(id(variable))
                    selected.setdefault(item.path, {})[variable.name] = variable
        if not selected:
            raise ValueError(
                f"DiffTuning found no trainable weight in model {model.name!r} for the "
                f"components {list(self.selected_components())} and targets "
                f"{list(self.targets)}. Name layers with `targets` (paths, globs or "
                "layer classes)."
            )
        order = {entry.path: i for i, entry in enumerate(index.entries)}
        return [
            DiffEdit(
                model,
                path,
                variables,
                self.epsilon,
                self.penalty,
                self.norm,
                self.save_density,
            )
            for path, variables in sorted(selected.items(), key=lambda item: order[item[0]])
        ]

    def _check_variable(self, path, variable):
        if "float" not in str(variable.dtype):
            raise NotImplementedError(
                f"DiffTuning trains floating-point weights, but {path}/{variable.name} "
                f"has dtype {variable.dtype} (a quantized layer?). Exclude the layer "
                "with `exclude`."
            )
        if isinstance(variable.constraint, DiffConstraint):
            raise ValueError(
                f"{path}/{variable.name} is already diff-tuned. Apply DiffTuning once "
                "per weight, or call keras_peft.remove(model) first."
            )
        if variable.constraint is not None or variable.regularizer is not None:
            raise ValueError(
                f"{path}/{variable.name} already has a constraint ({variable.constraint!r}) "
                f"or a regularizer ({variable.regularizer!r}), which DiffTuning would "
                "replace. Remove them from the variable (set them to None), or exclude "
                "the layer with `exclude`."
            )


@dataclasses.dataclass
class DiffStatistics:
    """How far each diff-tuned weight moved, and how much of it an adapter file keeps.

    Attributes:
        distances: `{"<layer path>/<variable name>": ‖W − W_0‖}`, in each
            method's norm.
        epsilons: `{key: ε}` of the ball each weight is kept in.
        entries: `{key: number of entries of W}`.
        stored: `{key: entries that save_adapter writes}` (all of them at
            `save_density=1`).
    """

    distances: dict
    epsilons: dict
    entries: dict
    stored: dict

    @property
    def density(self):
        """Share of the diff-tuned entries that adapter files keep, between 0 and 1."""
        total = sum(self.entries.values())
        return sum(self.stored.values()) / total if total else 0.0

    @property
    def max_distance_ratio(self):
        """Largest ‖W − W_0‖ / ε over all weights (at most 1 up to rounding)."""
        return max((self.distances[k] / self.epsilons[k] for k in self.distances), default=0.0)


def diff_statistics(model):
    """Return `DiffStatistics` for the `DiffTuning` methods applied to `model`.

    Raises `ValueError` when no `DiffTuning` is applied.
    """
    state = session.get_state(model)
    edits = []
    if state is not None:
        edits = [
            edit
            for application in state.applications
            if isinstance(application.method, DiffTuning)
            for edit in application.edits
        ]
    if not edits:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no DiffTuning applied. "
            "Call keras_peft.apply(model, keras_peft.DiffTuning(...)) first."
        )
    statistics = DiffStatistics({}, {}, {}, {})
    for edit in edits:
        for name, difference in edit.differences().items():
            key = f"{edit.path}/{name}"
            if edit.norm == "linf":
                distance = float(np.max(np.abs(difference))) if difference.size else 0.0
            else:
                distance = float(np.linalg.norm(difference.astype(np.float64)))
            statistics.distances[key] = distance
            statistics.epsilons[key] = edit.epsilon
            statistics.entries[key] = int(difference.size)
            statistics.stored[key] = (
                int(difference.size) if edit.density == 1 else kept_entries(difference.size, edit.density)
            )
    return statistics
