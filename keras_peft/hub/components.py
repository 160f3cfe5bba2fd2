"""Named parts ("components") of a transformer, for methods that select weights.

BitFit (`BiasOnly`) and diff tuning (`DiffTuning`) do not add layers; they
choose which existing variables train. They choose by component, a name for
the same part of every transformer block across KerasHub families:

| component | layers |
|---|---|
| `token_embedding` | the token embedding table (`backbone.token_embedding`) |
| `position_embedding` | learned absolute position embeddings |
| `query`, `key`, `value` | the q/k/v projections of every attention layer, self and cross |
| `attention_output` | the output projection of every self-attention layer |
| `cross_attention_output` | the output projection of every cross-attention layer |
| `ffn_intermediate`, `ffn_gate`, `ffn_output` | the feed-forward projections of every block |
| `layer_norm` | every normalisation layer (LayerNorm and the RMS norms) |

The projections are found through the role tables of `keras_peft.hub.roles`,
so the names mean the same layers on BERT, GPT-2, BART, Llama, T5 and the
other families listed there. GPT-NeoX packs q, k and v into one projection;
it is selected only when `query`, `key` and `value` are all selected.

A layer held by a keras_peft wrapper (a LoRA layer, say) is found through
the wrapper and reported at the wrapper's path, which is the path the layer
had before it was wrapped.
"""

import re

import keras

from keras_peft.core.replace import layer_attributes
from keras_peft.hub import roles

ATTENTION_COMPONENTS = ("query", "key", "value")
COMPONENTS = (
    "token_embedding",
    "position_embedding",
    "query",
    "key",
    "value",
    "attention_output",
    "cross_attention_output",
    "ffn_intermediate",
    "ffn_gate",
    "ffn_output",
    "layer_norm",
)

# `Backbone.token_embedding` is a property that reads `_token_embedding`.
_TOKEN_EMBEDDING_ATTRIBUTES = ("_token_embedding", "token_embedding")
_POSITION_EMBEDDING_ATTRIBUTES = (
    "position_embedding",
    "encoder_position_embedding",
    "decoder_position_embedding",
)
# KerasHub norm classes: LlamaLayerNorm, T5LayerNorm, MistralLayerNormalization,
# Gemma3nRMSNorm, QKNorm, ...
_NORM_CLASS_NAME = re.compile(r"(layer|rms|qk)norm", re.IGNORECASE)


def check_components(components, allowed, name="components"):
    """Validate a list of component names and return it as a tuple.

    Raises `ValueError` naming the unknown entries and listing `allowed`.
    """
    if isinstance(components, str):
        components = [components]
    try:
        components = tuple(components)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a list of component names such as "
            f"{list(allowed[:3])}. Received: {name}={components!r}"
        ) from None
    unknown = [c for c in components if c not in allowed]
    if unknown:
        raise ValueError(
            f"Unknown component(s) {unknown} in `{name}`. Valid components: "
            f"{list(allowed)}. Received: {name}={list(components)!r}"
        )
    return tuple(dict.fromkeys(components))


def is_normalization(layer):
    """Return whether `layer` is a normalisation layer of a transformer."""
    if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.RMSNormalization)):
        return True
    return _NORM_CLASS_NAME.search(type(layer).__name__) is not None


def unwrap(layer):
    """Return the base layer inside a keras_peft wrapper (through nested wrappers)."""
    while getattr(layer, "_keras_peft_wrapper", False):
        layer = layer.base_layer
    return layer


def inside_wrapper(entry):
    """Whether `entry` is the base layer held by a keras_peft wrapper."""
    return getattr(entry.parent, "_keras_peft_wrapper", False)


class ComponentLayer:
    """A layer selected by a component: its path, the layer, and the component."""

    def __init__(self, component, path, layer):
        self.component = component
        self.path = path
        self.layer = layer


def _attribute_layer(layer, names):
    attributes = layer_attributes(layer)
    for name in names:
        value = attributes.get(name)
        if isinstance(value, keras.layers.Layer):
            return value
    return None


class _Finder:
    """Looks up the components of one model, given its `LayerIndex`."""

    def __init__(self, index, skip_ids):
        self.index = index
        self.skip_ids = skip_ids
        self.entries = [e for e in index if not inside_wrapper(e) and id(e.layer) not in skip_ids]
        self.blocks = [e for e in self.entries if roles.is_block(unwrap(e.layer))]
        cross_ids = set()
        for block in self.blocks:
            _, cross = roles.attention_layers(unwrap(block.layer))
            if cross is not None:
                cross_ids.add(id(unwrap(cross)))
        self.self_attention = []
        self.cross_attention = []
        for entry in self.entries:
            layer = unwrap(entry.layer)
            if roles.is_attention(layer):
                target = self.cross_attention if id(layer) in cross_ids else self.self_attention
                target.append(layer)

    def _result(self, component, sublayer):
        entry = self.index.entry_of(sublayer)
        if entry is None or id(sublayer) in self.skip_ids:
            return None
        return ComponentLayer(component, entry.path, unwrap(sublayer))

    def attention_role(self, component, attention_layers, role):
        found = []
        for attention in attention_layers:
            for _, _, sublayer in roles.role_layers(attention, role):
                found.append(self._result(component, sublayer))
        return found

    def fused_qkv(self):
        found = []
        for attention in self.self_attention + self.cross_attention:
            fused = _attribute_layer(attention, roles.FUSED_ATTENTION_ATTRIBUTES)
            if fused is not None:
                found.append(self._result("query_key_value", fused))
        return found

    def feedforward_role(self, component):
        found = []
        for block in self.blocks:
            for _, _, sublayer in roles.role_layers(unwrap(block.layer), component):
                found.append(self._result(component, sublayer))
        return found

    def attribute_layers(self, component, names):
        found = []
        for entry in self.entries:
            sublayer = _attribute_layer(unwrap(entry.layer), names)
            if sublayer is not None:
                found.append(self._result(component, sublayer))
        return found

    def norms(self):
        return [
            ComponentLayer("layer_norm", e.path, unwrap(e.layer))
            for e in self.entries
            if is_normalization(unwrap(e.layer))
        ]

    def find(self, component):
        if component in ATTENTION_COMPONENTS:
            layers = self.self_attention + self.cross_attention
            return self.attention_role(component, layers, component)
        if component == "attention_output":
            return self.attention_role(component, self.self_attention, "attention_output")
        if component == "cross_attention_output":
            return self.attention_role(component, self.cross_attention, "attention_output")
        if component in roles.FEEDFORWARD_ROLES:
            return self.feedforward_role(component)
        if component == "token_embedding":
            return self.attribute_layers(component, _TOKEN_EMBEDDING_ATTRIBUTES)
        if component == "position_embedding":
            return self.attribute_layers(component, _POSITION_EMBEDDING_ATTRIBUTES)
        if component == "layer_norm":
            return self.norms()
        raise ValueError(f"Unknown component {component!r}; valid components: {list(COMPONENTS)}.")


def find_components(index, components, skip=()):
    """Return the layers of each component, in model order.

    Args:
        index: a `LayerIndex` of the model.
        components: validated component names.
        skip: layers never to select (a task head, excluded paths); wrappers
            and the layers they hold are both skipped when either is listed.

    Returns:
        `{component: [ComponentLayer, ...]}` with each layer once per
        component. A fused q/k/v projection (GPT-NeoX) appears under
        `"query_key_value"` when `query`, `key` and `value` are all
        requested.

    Raises:
        ValueError: when some but not all of `query`, `key` and `value` are
            requested on a model whose attention fuses them.
    """
    skip_ids = set()
    for layer in skip:
        skip_ids.add(id(layer))
        skip_ids.add(id(unwrap(layer)))
    finder = _Finder(index, skip_ids)
    order = {id(e.layer): i for i, e in enumerate(index.entries)}

    def in_model_order(found):
        unique = {}
        for item in found:
            if item is not None and id(item.layer) not in unique:
                unique[id(item.layer)] = item
        entry_order = lambda item: order.get(id(index.get(item.path).layer), 0)  # noqa: E731
        return sorted(unique.values(), key=entry_order)

    result = {component: in_model_order(finder.find(component)) for component in components}

    fused = in_model_order(finder.fused_qkv())
    requested = [c for c in ATTENTION_COMPONENTS if c in components]
    if fused and requested:
        if len(requested) < len(ATTENTION_COMPONENTS):
            raise ValueError(
                f"The attention of this model computes query, key and value with one "
                f"fused projection ({fused[0].path!r}), so {requested} cannot be "
                "selected alone. Select all of 'query', 'key' and 'value', or none."
            )
        result["query_key_value"] = fused
    return result
