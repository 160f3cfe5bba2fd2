"""The `Adapter` method: bottleneck adapters after the sublayers of transformer blocks.

Where the adapters sit
----------------------
Each adapter wraps a sublayer's output projection in an `AdapterWrapper`,
so it transforms that sublayer's output after the projection back to the
hidden size d and before the block adds the residual. The two block layouts
of KerasHub then give:

- post-layer-norm blocks (BERT, BART): `h = LayerNorm(x + Adapter(Sublayer(x)))`,
  the placement of Houlsby et al. (2019), whose adapter output goes into the
  residual add and then the layer norm;
- pre-layer-norm blocks (GPT-2, Llama, Gemma, T5):
  `h = x + Adapter(Sublayer(LayerNorm(x)))`. Gemma's optional post-sublayer
  norms come after the adapter, just before the residual add.

The other reading of the placement, an adapter on the block's hidden state
after "residual + layer norm", is not used. A pre-layer-norm block has no
such point, because its norm sits at the start of the next sublayer, so that
rule would place adapters differently per family. Wrapping the output
projections is one rule that gives the placement of Houlsby et al. on every
family. The block's dropout on the sublayer output comes after the adapter
here, while the authors' implementation (google-research/adapter-bert)
applies it before; both orders agree at inference, where dropout is off.

Layer norms stay frozen (Houlsby et al. also train them); only the adapters
and the task head train.
"""

import dataclasses
import numbers

from keras_peft.core.paths import LayerEntry
from keras_peft.core.paths import sublayers
from keras_peft.core.replace import find_references
from keras_peft.core.replace import layer_attributes
from keras_peft.core.targets import check_targets
from keras_peft.core.targets import describe_target
from keras_peft.core.targets import match_targets
from keras_peft.core.targets import no_match_message
from keras_peft.core.validation import check_rank
from keras_peft.core.wrap import WrapEdit
from keras_peft.hub import roles
from keras_peft.layers.adapter_block import AdapterWrapper
from keras_peft.layers.adapter_block import check_activation_name
from keras_peft.layers.adapter_block import output_size
from keras_peft.methods.base import Method
from keras_peft.methods.base import register_method

# The sublayers of a transformer block whose outputs get an adapter, per placement.
PLACEMENTS = {
    # Houlsby et al. (2019): after self-attention, after cross-attention where
    # the block has it, and after the feed-forward network.
    "houlsby": ("self_attention", "cross_attention", "feedforward"),
    # Pfeiffer et al. (2021): after the feed-forward network only.
    "pfeiffer": ("feedforward",),
}

# Used when neither `bottleneck` nor `reduction_factor` is given; 16 is the
# reduction factor of Pfeiffer et al. (2021).
DEFAULT_REDUCTION_FACTOR = 16

_ADAPTER_VARIABLES = ("down_kernel", "down_bias", "up_kernel", "up_bias")


@dataclasses.dataclass(eq=False)
class _Site:
    """A layer whose output gets an adapter, and the block that contains it."""

    entry: LayerEntry
    block: LayerEntry | None


def _inside_wrapper(entry):
    parent = entry.parent
    return parent is not None and getattr(parent, "_keras_peft_wrapper", False)


def _ancestors(index, entry):
    """Yield `entry`, then the entry of its parent, up to the root's child."""
    while entry is not None:
        yield entry
        entry = index.entry_of(entry.parent) if entry.parent is not None else None


def _enclosing_block(index, entry):
    for ancestor in _ancestors(index, entry):
        if roles.is_block(ancestor.layer):
            return ancestor
    return None


def _stack_of(index, block):
    """Return `(key, description, position, size)` of a block in its stack.

    A stack is the list attribute that holds the block, such as
    `transformer_layers` or `decoder_transformer_layers` of a backbone.
    Blocks held in no list are numbered by order among their sibling blocks.
    """
    parent = block.parent
    parent_entry = index.entry_of(parent)
    parent_name = parent_entry.path if parent_entry is not None else parent.name
    attributes = layer_attributes(parent)
    for name, position in find_references(parent, block.layer).list_slots:
        # Skip lists that hold other layers too, such as a functional model's
        # `_operations`.
        stack = attributes[name]
        if all(roles.is_block(item) for item in stack):
            return (id(parent), name), f"{parent_name}.{name}", position, len(stack)
    siblings = [child for child in sublayers(parent) if roles.is_block(child)]
    position = next(i for i, child in enumerate(siblings) if child is block.layer)
    return (id(parent), None), f"the transformer blocks of {parent_name}", position, len(siblings)


def _check_layers(layers):
    if layers is None:
        return None
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = tuple(layers)
    except TypeError:
        raise TypeError(
            "`layers` must be a list of block indices such as [0, 3], or None for "
            f"every block. Received: layers={layers!r}"
        ) from None
    if not layers:
        raise ValueError(
            "`layers` must name at least one block index, or be None for every "
            "block. Received: layers=[]"
        )
    for layer_index in layers:
        if isinstance(layer_index, bool) or not isinstance(layer_index, numbers.Integral):
            raise TypeError(
                "Each entry of `layers` must be an int block index. Received: "
                f"{layer_index!r} in layers={list(layers)!r}"
            )
    return tuple(int(i) for i in layers)


def _check_reduction_factor(reduction_factor):
    if (
        isinstance(reduction_factor, bool)
        or not isinstance(reduction_factor, numbers.Real)
        or not 1 <= reduction_factor < float("inf")
    ):
        raise ValueError(
            "`reduction_factor` must be a finite number of at least 1 (the "
            "bottleneck is hidden_size // reduction_factor). Received: "
            f"reduction_factor={reduction_factor!r}"
        )


@register_method
class Adapter(Method):
    """Bottleneck adapters after the attention and feed-forward sublayers.

    Each adapter computes `Adapter(y) = y + W_up · act(W_down · y + b_down) + b_up`
    on the output y of a sublayer (see `keras_peft.layers.AdapterBlock`), with
    W_up and b_up zero at start, so the adapted model first computes exactly
    what the base model computes. Only the adapters train (plus a task head,
    see `keras_peft.apply`); an adapter has `2·d·r + r + d` parameters for
    hidden size d and bottleneck r.

    Placement in each transformer block (`placement="houlsby"`): one adapter
    after the self-attention sublayer and one after the feed-forward sublayer.
    Decoder blocks of encoder-decoder models (BART, T5) get one more after
    cross-attention. That makes 2 per encoder or decoder-only block and 3 per
    encoder-decoder decoder block. `placement="pfeiffer"` puts one adapter
    after the feed-forward sublayer only. Each adapter wraps the sublayer's
    output projection, so it acts before the residual add in every family;
    the module docstring of `keras_peft.methods.adapter` gives the layer
    norm positions.

    Args:
        bottleneck: int > 0, the bottleneck size r of every adapter; must not
            exceed the hidden size. Give this or `reduction_factor`.
        reduction_factor: number >= 1; each adapter gets a bottleneck of
            `hidden_size // reduction_factor`. Defaults to 16 when
            `bottleneck` is not given either.
        activation: Keras activation name between the two projections.
            Defaults to `"relu"`.
        placement: `"houlsby"` or `"pfeiffer"`, see above. Defaults to
            `"houlsby"`.
        layers: block indices to adapt, such as `[0, 3]` (negative indices
            count from the end), or None for every block. An index counts
            within its stack, so in an encoder-decoder `layers=[0]` adapts
            encoder block 0 and decoder block 0; restrict `targets` to one
            stack to adapt only its blocks. Defaults to `None`.
        targets: None for every transformer block of the model, or the layers
            to adapt in the target forms of `keras_peft.core.targets`. A
            matched transformer block gets adapters by `placement`, a matched
            attention layer one after its output projection, and any other
            matched layer one on its own output. A target that matches a block
            or attention layer covers the layers inside it. Defaults to `None`.
        exclude: targets to leave out, in the same forms. An adapter is left
            out when its wrapped layer or any layer containing it matches, so
            `exclude=["cross_attention"]` drops the cross-attention adapters.
            Defaults to `()`.

    Example:

    >>> method = Adapter(bottleneck=64, layers=[0, 3])
    >>> method.get_config()["placement"]
    'houlsby'

    References:
        Houlsby et al., "Parameter-Efficient Transfer Learning for NLP",
        ICML 2019. Pfeiffer et al., "AdapterFusion: Non-Destructive Task
        Composition for Transfer Learning", EACL 2021.
    """

    kind = "adapter"

    def __init__(
        self,
        bottleneck=None,
        reduction_factor=None,
        activation="relu",
        placement="houlsby",
        layers=None,
        targets=None,
        exclude=(),
    ):
        if bottleneck is not None and reduction_factor is not None:
            raise ValueError(
                "Give either `bottleneck` or `reduction_factor`, not both. Received: "
                f"bottleneck={bottleneck!r}, reduction_factor={reduction_factor!r}"
            )
        if bottleneck is not None:
            check_rank(bottleneck, "bottleneck")
            bottleneck = int(bottleneck)
        else:
            if reduction_factor is None:
                reduction_factor = DEFAULT_REDUCTION_FACTOR
            _check_reduction_factor(reduction_factor)
        check_activation_name(activation)
        if placement not in PLACEMENTS:
            raise ValueError(
                f"Unknown adapter placement {placement!r}. Use one of: "
                f"{', '.join(repr(name) for name in PLACEMENTS)}. Received: placement={placement!r}"
            )
        self.bottleneck = bottleneck
        self.reduction_factor = reduction_factor
        self.activation = activation
        self.placement = placement
        self.layers = _check_layers(layers)
        if targets is None:
            self.targets = None
        else:
            self.targets = check_targets(targets, "targets")
            if not self.targets:
                raise ValueError(
                    "`targets` must name at least one layer, or be None for every "
                    "transformer block. Received: targets=[]"
                )
        self.exclude = check_targets(exclude, "exclude")

    def get_config(self):
        for target in (self.targets or ()) + self.exclude:
            if not isinstance(target, str):
                raise TypeError(
                    f"Adapter target {describe_target(target)} is not a string, so it "
                    "cannot be written to an adapter file. Use path strings or role "
                    "names in targets and exclude to save the adapter."
                )
        return {
            "bottleneck": self.bottleneck,
            "reduction_factor": self.reduction_factor,
            "activation": self.activation,
            "placement": self.placement,
            "layers": None if self.layers is None else list(self.layers),
            "targets": None if self.targets is None else list(self.targets),
            "exclude": list(self.exclude),
        }

    def __repr__(self):
        size = (
            f"bottleneck={self.bottleneck}"
            if self.bottleneck is not None
            else f"reduction_factor={self.reduction_factor}"
        )

        def shown(targets):
            return [t if isinstance(t, str) else describe_target(t) for t in targets]

        targets = None if self.targets is None else shown(self.targets)
        layers = None if self.layers is None else list(self.layers)
        return (
            f"Adapter({size}, activation={self.activation!r}, placement={self.placement!r}, "
            f"layers={layers!r}, targets={targets!r}, exclude={shown(self.exclude)!r})"
        )

    def check_mergeable(self):
        """Raise: an adapter's nonlinearity cannot be folded into base weights."""
        raise NotImplementedError(
            "Adapters cannot be merged into the base weights: each adds a nonlinear "
            "layer (W_up · act(W_down · y)) that no weight of the base model can "
            "express. Keep the adapted model and save it with "
            "keras_peft.save_adapter, or call keras_peft.remove(model) to drop the "
            "adapters."
        )

    # Planning.

    def plan(self, model, index):
        sites = self._select_sites(model, index)
        sites = self._filter_by_block_index(index, sites)
        sites = self._drop_excluded(index, sites)
        if not sites:
            raise ValueError(
                f"Adapter matched no layer of model {model.name!r} once `layers` and "
                f"`exclude` were applied ({self!r}). Loosen `exclude` or `layers`."
            )
        return [self._edit(site, self._bottleneck_for(site)) for site in sites]

    def _select_sites(self, model, index):
        if self.targets is None:
            blocks = [entry for entry in index if roles.is_block(entry.layer)]
            if not blocks:
                raise ValueError(
                    f"Model {model.name!r} has no transformer block that keras_peft "
                    "recognises (a layer containing an attention layer with query, key "
                    "and value projections). Pass targets=[...] with the paths of the "
                    "layers whose outputs should get an adapter."
                )
            selected = blocks
        else:
            matches = match_targets(index, self.targets, skip=_inside_wrapper)
            selected = []
            for target, entries in matches.items():
                if not entries:
                    raise ValueError(no_match_message(target, index, "Adapter"))
                selected.extend(self._outermost(index, entries))

        sites = []
        seen = set()
        for entry in selected:
            for site_entry in self._expand(index, entry):
                if id(site_entry.layer) in seen:
                    continue
                seen.add(id(site_entry.layer))
                sites.append(_Site(site_entry, _enclosing_block(index, site_entry)))
        order = {id(entry.layer): i for i, entry in enumerate(index.entries)}
        sites.sort(key=lambda site: order[id(site.entry.layer)])
        return sites

    @staticmethod
    def _outermost(index, entries):
        """Drop entries inside a matched block or attention layer, which covers them."""
        covering = {
            id(entry.layer)
            for entry in entries
            if roles.is_block(entry.layer) or roles.is_attention(entry.layer)
        }
        kept = []
        for entry in entries:
            ancestors = list(_ancestors(index, entry))[1:]
            if not any(id(ancestor.layer) in covering for ancestor in ancestors):
                kept.append(entry)
        return kept

    def _expand(self, index, entry):
        """Return the entries of the layers to wrap for one matched layer."""
        layer = entry.layer
        if roles.is_block(layer):
            return self._block_sites(index, entry)
        if roles.is_attention(layer):
            return [self._attention_output(index, entry, layer, "attention")]
        return [entry]

    def _block_sites(self, index, block):
        self_attention, cross_attention = roles.attention_layers(block.layer)
        found = []
        for sublayer in PLACEMENTS[self.placement]:
            if sublayer == "self_attention":
                found.append(self._attention_output(index, block, self_attention, "self-attention"))
            elif sublayer == "cross_attention" and cross_attention is not None:
                found.append(self._attention_output(index, block, cross_attention, "cross-attention"))
            elif sublayer == "feedforward":
                projections = roles.role_layers(block.layer, "ffn_output")
                if not projections:
                    raise NotImplementedError(
                        f"Transformer block {block.path!r} ({type(block.layer).__name__}) "
                        "has no feed-forward output projection that keras_peft "
                        f"recognises (attribute names: {', '.join(roles.FEEDFORWARD_ROLES['ffn_output'])}). "
                        "Target the layer whose output should get the adapter by its path."
                    )
                found.append(self._entry_of(index, projections[0][2], block))
        return found

    def _attention_output(self, index, owner, attention, description):
        """Return the entry of an attention layer's output projection.

        `owner` is the entry of the block that contains the attention layer,
        or of the attention layer itself, for error messages.
        """
        projections = roles.role_layers(attention, "attention_output")
        if not projections:
            raise NotImplementedError(
                f"The {description} layer {type(attention).__name__} of "
                f"{owner.path!r} has no output projection that "
                "keras_peft recognises (attribute names: "
                f"{', '.join(roles.ATTENTION_ROLES['attention_output'])}). Target "
                "the layer whose output should get the adapter by its path."
            )
        return self._entry_of(index, projections[0][2], owner)

    @staticmethod
    def _entry_of(index, layer, owner):
        entry = index.entry_of(layer)
        if entry is None:
            raise ValueError(
                f"Layer {layer.name!r} in {owner.path!r} is not tracked by the model, "
                "so it cannot be replaced by an adapter wrapper."
            )
        return entry

    def _filter_by_block_index(self, index, sites):
        if self.layers is None:
            return sites
        stacks = {}
        positions = {}
        for site in sites:
            if site.block is None:
                raise ValueError(
                    f"`layers` selects transformer blocks by index, but the adapted "
                    f"layer {site.entry.path!r} is not inside a transformer block. Set "
                    "layers=None and choose the layers with `targets`."
                )
            key, description, position, size = _stack_of(index, site.block)
            stacks[key] = (description, size)
            positions[id(site)] = (key, position)

        for description, size in stacks.values():
            for layer_index in self.layers:
                if not -size <= layer_index < size:
                    raise ValueError(
                        f"Block index {layer_index} in layers={list(self.layers)} is out "
                        f"of range for {description}, which has {size} blocks (indices 0 "
                        f"to {size - 1}, or -{size} to -1 counting from the end)."
                    )
        kept = []
        for site in sites:
            key, position = positions[id(site)]
            size = stacks[key][1]
            if position in {layer_index % size for layer_index in self.layers}:
                kept.append(site)
        return kept

    def _drop_excluded(self, index, sites):
        if not self.exclude:
            return sites
        excluded = set()
        for entries in match_targets(index, self.exclude).values():
            excluded.update(id(entry.layer) for entry in entries)
        return [
            site
            for site in sites
            if not any(id(a.layer) in excluded for a in _ancestors(index, site.entry))
        ]

    def _bottleneck_for(self, site):
        """Check the layer at `site` and return its adapter's bottleneck size."""
        path = site.entry.path
        layer = site.entry.layer
        if isinstance(layer, AdapterWrapper):
            raise ValueError(
                f"Layer {path!r} already has an adapter. Call keras_peft.remove(model) "
                "before applying adapters to it again, or leave it out with `exclude` "
                "or `layers`."
            )
        if getattr(layer, "_keras_peft_wrapper", False):
            raise ValueError(
                f"Layer {path!r} is already wrapped by {type(layer).__name__}, and an "
                "adapter cannot wrap the same layer. Leave it out of one of the "
                "methods with `exclude`."
            )
        if not layer.built:
            raise ValueError(
                f"Layer {path!r} is not built. Build the model (call it once on data) "
                "before applying adapters."
            )
        try:
            hidden_size = output_size(layer)
        except ValueError as error:
            raise ValueError(f"Cannot add an adapter after {path!r}: {error}") from None

        if self.bottleneck is not None:
            bottleneck = self.bottleneck
            if bottleneck > hidden_size:
                raise ValueError(
                    f"bottleneck={bottleneck} is larger than the hidden size "
                    f"{hidden_size} of layer {path!r}. Use a bottleneck between 1 and "
                    f"{hidden_size}."
                )
        else:
            bottleneck = int(hidden_size // self.reduction_factor)
            if bottleneck < 1:
                raise ValueError(
                    f"reduction_factor={self.reduction_factor} leaves no bottleneck for "
                    f"layer {path!r} with hidden size {hidden_size} ({hidden_size} // "
                    f"{self.reduction_factor} = 0). Use a reduction factor of at most "
                    f"{hidden_size} or pass bottleneck=..."
                )
        return bottleneck

    def _edit(self, site, bottleneck):
        activation = self.activation

        def make_wrapper(layer):
            return AdapterWrapper(layer, bottleneck=bottleneck, activation=activation)

        return WrapEdit(
            path=site.entry.path,
            parent=site.entry.parent,
            layer=site.entry.layer,
            make_wrapper=make_wrapper,
            trainable_names=_ADAPTER_VARIABLES,
        )
