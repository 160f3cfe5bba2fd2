"""The `BiasOnly` method (BitFit): train the bias terms and nothing else.

BitFit adds no layer. It selects existing bias vectors, and `keras_peft.apply`
freezes every other weight through the variables' `trainable` flags.
"""

# A module import: keras_peft.core.session imports keras_peft.methods.base.
from keras_peft.core import session
from keras_peft.core.targets import check_targets
from keras_peft.core.targets import describe_target
from keras_peft.core.targets import match_targets
from keras_peft.core.targets import no_match_message
from keras_peft.hub.components import ATTENTION_COMPONENTS
from keras_peft.hub.components import ComponentLayer
from keras_peft.hub.components import check_components
from keras_peft.hub.components import find_components
from keras_peft.hub.components import inside_wrapper
from keras_peft.hub.components import unwrap
from keras_peft.methods.base import Edit
from keras_peft.methods.base import Method
from keras_peft.methods.base import register_method
from keras_peft.methods.base import variable_to_numpy

# Names of bias variables: `bias` in Dense and EinsumDense, `beta` in LayerNormalization.
BIAS_NAMES = ("bias", "beta")

BITFIT_COMPONENTS = (
    "attention_output",
    "layer_norm",
    "ffn_intermediate",
    "ffn_output",
    "cross_attention_output",
    "query",
    "key",
    "value",
    "ffn_gate",
    "head",
)
DEFAULT_COMPONENTS = (
    "attention_output",
    "layer_norm",
    "ffn_intermediate",
    "ffn_output",
    "cross_attention_output",
    "head",
)


def own_variables(layer):
    """Return the variables a layer creates itself, not those of its sublayers."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def originally_trainable(model, variable):
    """Return whether `variable` was trainable before keras_peft changed the model."""
    state = session.get_state(model)
    if state is None:
        return variable.trainable
    return state.original_trainable.get(id(variable), (variable, variable.trainable))[1]


def string_targets(method_name, targets):
    """Return `targets` as a list for a config, or raise if one is not a string."""
    for target in targets:
        if not isinstance(target, str):
            raise TypeError(
                f"{method_name} target {describe_target(target)} is not a string, so "
                "it cannot be written to an adapter file. Use path strings or role "
                "names in targets and exclude to save the adapter."
            )
    return list(targets)


def select_target_layers(index, targets, exclude, method_name):
    """Return `ComponentLayer`s for layer targets; each target must match a layer."""
    selected = []
    matches = match_targets(index, targets, exclude, skip=inside_wrapper)
    for target, entries in matches.items():
        if not entries:
            raise ValueError(no_match_message(target, index, method_name))
        selected.extend(ComponentLayer("targets", e.path, unwrap(e.layer)) for e in entries)
    return selected


def excluded_layers(index, exclude):
    """Return the layers that `exclude` targets match."""
    if not exclude:
        return []
    matches = match_targets(index, exclude)
    return [entry.layer for entries in matches.values() for entry in entries]


class BiasEdit(Edit):
    """Make the bias variables of one layer trainable; nothing else changes.

    The layer keeps its structure, so the edit can share its path with other
    methods (LoRA on the same projection, say). `undo` gives the biases back
    the values they had when the edit was applied, unless the layer is a
    task head, whose trained weights `keras_peft.remove` keeps.
    """

    exclusive = False

    def __init__(self, path, variables, restore_on_undo=True):
        super().__init__(path)
        self.variables = dict(variables)
        self.restore_on_undo = restore_on_undo
        self._initial_values = None

    def apply(self):
        self._initial_values = {name: variable_to_numpy(v) for name, v in self.variables.items()}

    def undo(self):
        if self._initial_values is None:
            return
        if self.restore_on_undo:
            for name, variable in self.variables.items():
                variable.assign(self._initial_values[name])
        self._initial_values = None

    def merge(self):
        # The trained biases are already the layer's own weights.
        self._initial_values = None

    def trainable_variables(self):
        return list(self.variables.values())

    def saved_variables(self):
        return dict(self.variables)


@register_method
class BiasOnly(Method):
    """BitFit: train only bias terms, keeping every weight matrix frozen.

    No layer is added. The selected bias vectors train, everything else is
    frozen through the variables' `trainable` flags, and a KerasHub task's
    head trains as with every method (see `keras_peft.apply`). By default
    these biases train, as in the BitFit paper's table for transformers:

    | component | bias | shape |
    |---|---|---|
    | `attention_output` | b_O of each self-attention output projection | d |
    | `layer_norm` | β of each layer normalisation | d |
    | `ffn_intermediate` | b_1 of each feed-forward block | 4d (the intermediate size) |
    | `ffn_output` | b_2 of each feed-forward block | d |
    | `cross_attention_output` | b_O of each cross-attention output projection (decoders of encoder-decoders) | d |
    | `head` | the bias of each layer of a KerasHub task's head (a classifier's output layer) | number of classes |

    The query, key and value biases are added with `include_qkv=True`, or by
    naming `"query"`, `"key"` and `"value"` in `components`. A KerasHub causal
    language model has no head bias: its logits come from the token embedding
    transposed (tied weights), so BitFit trains only the backbone's biases.

    Models without bias terms (Llama, Gemma, Mistral, T5 and other models
    with bias-free projections and RMS normalisation) raise `ValueError`:
    BitFit has nothing to train there, so use LoRA or adapters.

    `keras_peft.remove` restores the pretrained biases (a trained head keeps
    its weights, as with every method); `keras_peft.merge` keeps the trained
    ones. Adapter files hold only the selected biases and the head.

    Args:
        components: component names to train the biases of, from
            `"attention_output"`, `"layer_norm"`, `"ffn_intermediate"`,
            `"ffn_output"`, `"cross_attention_output"`, `"query"`, `"key"`,
            `"value"`, `"ffn_gate"` and `"head"`. Each named component must
            have at least one bias in the model. Defaults to `None`: the
            table above, skipping components that the model lacks.
        include_qkv: bool, whether the query, key and value biases train too.
            Defaults to `False`.
        targets: further layers whose `bias`/`beta` variables train, in the
            forms of `keras_peft.core.targets` (paths, globs, regular
            expressions, layer classes). Defaults to `()`.
        exclude: layers to leave frozen, in the same forms. Defaults to `()`.

    Example:

    >>> method = BiasOnly(include_qkv=True)
    >>> method.selected_components()[-3:]
    ('query', 'key', 'value')

    References:
        Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient
        Fine-tuning for Transformer-based Masked Language-models", ACL 2022.
    """

    kind = "bitfit"

    def __init__(self, components=None, include_qkv=False, targets=(), exclude=()):
        if components is not None:
            components = check_components(components, BITFIT_COMPONENTS)
            if not components:
                raise ValueError(
                    "`components` must name at least one component, or be None for "
                    f"the default {list(DEFAULT_COMPONENTS)}. Received: components=[]"
                )
        if not isinstance(include_qkv, bool):
            raise TypeError(f"`include_qkv` must be True or False. Received: include_qkv={include_qkv!r}")
        self.components = components
        self.include_qkv = include_qkv
        self.targets = check_targets(targets, "targets")
        self.exclude = check_targets(exclude, "exclude")

    def selected_components(self):
        """Return the component names this method trains the biases of."""
        components = DEFAULT_COMPONENTS if self.components is None else self.components
        if self.include_qkv:
            components = tuple(dict.fromkeys(components + ATTENTION_COMPONENTS))
        return components

    def get_config(self):
        return {
            "components": None if self.components is None else list(self.components),
            "include_qkv": self.include_qkv,
            "targets": string_targets("BiasOnly", self.targets),
            "exclude": string_targets("BiasOnly", self.exclude),
        }

    def __repr__(self):
        components = None if self.components is None else list(self.components)
        return (
            f"BiasOnly(components={components!r}, include_qkv={self.include_qkv}, "
            f"targets={list(self.targets)!r}, exclude={list(self.exclude)!r})"
        )

    def plan(self, model, index):
        selected = self.selected_components()
        head_layers = [entry.layer for entry in session.task_head_entries(model, index)]
        excluded = excluded_layers(index, self.exclude)
        excluded_ids = {id(layer) for layer in excluded}
        backbone_components = tuple(c for c in selected if c != "head")
        found = find_components(index, backbone_components, skip=head_layers + excluded)
        if "head" in selected:
            found["head"] = [
                ComponentLayer("head", index.path_of(layer), unwrap(layer))
                for layer in head_layers
                if id(layer) not in excluded_ids
            ]
        found["targets"] = select_target_layers(index, self.targets, self.exclude, "BiasOnly")

        biases = {}  # path -> (component, {name: variable})
        for component, layers in found.items():
            for item in layers:
                variables = {
                    v.name: v
                    for v in own_variables(item.layer)
                    if v.name in BIAS_NAMES and originally_trainable(model, v)
                }
                if not variables:
                    continue
                _, known = biases.setdefault(item.path, (component, {}))
                known.update(variables)

        self._check_selection(model, index, found, biases)
        order = {entry.path: i for i, entry in enumerate(index.entries)}
        return [
            BiasEdit(path, variables, restore_on_undo=component != "head")
            for path, (component, variables) in sorted(biases.items(), key=lambda item: order[item[0]])
        ]

    def _check_selection(self, model, index, found, biases):
        with_bias = {
            component for component, layers in found.items() if any(item.path in biases for item in layers)
        }
        if self.components is not None:
            missing = [c for c in self.components if c not in with_bias]
            if missing:
                raise ValueError(
                    f"BiasOnly: model {model.name!r} has no trainable bias in the "
                    f"component(s) {missing}. Leave them out of `components`, or "
                    "pass components=None for the default selection, which skips "
                    "components a model lacks."
                )
        if not any(component != "head" for component in with_bias):
            raise ValueError(self._no_bias_message(model, index))

    def _no_bias_message(self, model, index):
        hint = ""
        if not self.include_qkv:
            qkv = find_components(index, ATTENTION_COMPONENTS)
            has_qkv_bias = any(
                v.name in BIAS_NAMES for items in qkv.values() for item in items for v in own_variables(item.layer)
            )
            if has_qkv_bias:
                hint = (
                    " Its query/key/value projections do have biases: "
                    "BiasOnly(include_qkv=True) trains those."
                )
        return (
            f"BiasOnly found no bias terms to train in model {model.name!r}: no layer "
            f"in the components {list(self.selected_components())} has a bias or a "
            "layer-norm beta. Models such as Llama, Gemma, Mistral and T5 use "
            "projections without bias and RMS normalisation without beta, so BitFit "
            f"cannot adapt them.{hint} Use keras_peft.LoRA(...) or adapters instead."
        )

