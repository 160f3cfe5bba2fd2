"""What each sublayer of a KerasHub transformer block does, across families.

KerasHub 0.32 families name the same projection differently: the query is
`_query_dense` (BERT, GPT-2, OPT, BART, Llama, Mistral, Qwen, Bloom, DeBERTa),
`query_dense` (Gemma, Mixtral, Phi-3, Falcon), `query_projector` (T5) or
`q_proj` (SmolLM3). The tables below map a role name such as `"query"` to
those attribute names, so `targets=["query", "value"]` means the same thing
on every family. Attention layers and transformer blocks are recognised by
these attributes, not by class, so subclasses and new families that keep the
names work too.
"""

from keras_peft.core.replace import layer_attributes

ATTENTION_ROLES = {
    "query": ("_query_dense", "query_dense", "query_projector", "q_proj"),
    "key": ("_key_dense", "key_dense", "key_projector", "k_proj"),
    "value": ("_value_dense", "value_dense", "value_projector", "v_proj"),
    "attention_output": ("_output_dense", "output_dense", "output_projector", "o_proj"),
}

# Fused projections that no single role covers (GPT-NeoX packs q, k and v).
FUSED_ATTENTION_ATTRIBUTES = ("_qkv_dense",)

FEEDFORWARD_ROLES = {
    "ffn_intermediate": (
        "_feedforward_intermediate_dense",
        "feedforward_intermediate_dense",
        "_mlp_intermediate_dense",
        "dense_h_to_4h",
        "gating_ffw_2",
        "input_projector",
        "up_proj",
    ),
    "ffn_gate": (
        "_feedforward_gate_dense",
        "feedforward_gate_dense",
        "gating_ffw",
        "gate_projector",
        "gate_proj",
    ),
    "ffn_output": (
        "_feedforward_output_dense",
        "feedforward_output_dense",
        "_mlp_output_dense",
        "dense_4h_to_h",
        "ffw_linear",
        "output_projector",
        "down_proj",
    ),
}

# Attributes of a block that hold its attention layers.
SELF_ATTENTION_ATTRIBUTES = (
    "_self_attention_layer",
    "self_attention",
    "attention",
    "attention_layer",
    "self_attn",
    "mha",
)
CROSS_ATTENTION_ATTRIBUTES = ("_cross_attention_layer", "cross_attention")
# Attributes of a block that hold a feed-forward sublayer with its own projections.
FEEDFORWARD_CONTAINER_ATTRIBUTES = ("mlp",)

ROLES = {**ATTENTION_ROLES, **FEEDFORWARD_ROLES}
ROLE_ALIASES = {"q": "query", "k": "key", "v": "value", "o": "attention_output", "output": "attention_output"}


def _first_attribute(layer, names):
    attributes = layer_attributes(layer)
    for name in names:
        value = attributes.get(name)
        if value is not None:
            return name, value
    return None, None


def is_attention(layer):
    """Return whether `layer` looks like an attention layer (has q/k/v or fused qkv projections)."""
    has_qkv = all(_first_attribute(layer, ATTENTION_ROLES[role])[1] is not None for role in ("query", "key", "value"))
    has_fused = _first_attribute(layer, FUSED_ATTENTION_ATTRIBUTES)[1] is not None
    return has_qkv or has_fused


def attention_layers(block):
    """Return `(self_attention, cross_attention)` of a transformer block (None when absent)."""
    _, self_attention = _first_attribute(block, SELF_ATTENTION_ATTRIBUTES)
    if self_attention is not None and not is_attention(self_attention):
        self_attention = None
    _, cross_attention = _first_attribute(block, CROSS_ATTENTION_ATTRIBUTES)
    if cross_attention is not None and not is_attention(cross_attention):
        cross_attention = None
    return self_attention, cross_attention


def is_block(layer):
    """Return whether `layer` looks like a transformer block (contains an attention layer)."""
    return attention_layers(layer)[0] is not None


def feedforward_owner(block):
    """Return the layer that holds the block's feed-forward projections."""
    _, container = _first_attribute(block, FEEDFORWARD_CONTAINER_ATTRIBUTES)
    return container if container is not None else block


def role_layers(layer, role):
    """Return the sublayers of `layer` that play `role`, as `(owner, attribute, sublayer)`.

    `layer` is any layer of a model; only attention layers have attention
    roles and only transformer blocks have feed-forward roles.
    """
    found = []
    if role in ATTENTION_ROLES and is_attention(layer):
        attribute, sublayer = _first_attribute(layer, ATTENTION_ROLES[role])
        if sublayer is not None:
            found.append((layer, attribute, sublayer))
    if role in FEEDFORWARD_ROLES and is_block(layer):
        owner = feedforward_owner(layer)
        attribute, sublayer = _first_attribute(owner, FEEDFORWARD_ROLES[role])
        if sublayer is not None:
            found.append((owner, attribute, sublayer))
    return found


def canonical_role(name):
    """Return the role that `name` denotes, or None when it is not a role name."""
    name = ROLE_ALIASES.get(name, name)
    return name if name in ROLES else None
