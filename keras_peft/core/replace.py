"""Replacing a sublayer of a built layer, in place.

KerasHub blocks call their sublayers through attributes
(`self._query_dense(x)`), and functional models call the operation stored in
each graph node. A swap therefore rebinds every attribute and list slot of the
parent that holds the old layer and every node of a functional parent that
runs it, so the functional forward pass, `call_with_cache` and `generate` all
see the new layer.

A built layer locks its state tracker; the swap unlocks it, replaces the old
layer in the tracked-sublayer list at the same position (so sibling order, and
with it every layer path, stays the same) and locks it again. Keras' own
`Dense.enable_lora` unlocks the tracker the same way to add variables.
"""

import contextlib

import keras
from keras.src.models.functional import Functional


def layer_attributes(layer):
    """Return the instance attributes of a layer as a dict.

    On the torch backend Keras layers are also `torch.nn.Module`s, which keep
    sublayer attributes in `_modules` rather than in the instance dict.
    """
    attributes = dict(vars(layer))
    attributes.update(vars(layer).get("_modules", None) or {})
    return attributes


# Keras and TensorFlow bookkeeping lists: the tracked sublayers are updated
# separately, graph operations through the nodes, and the rest is not used to
# call sublayers.
_BOOKKEEPING_ATTRIBUTES = {
    "_layers",
    "_tracker",
    "_modules",
    "_operations",
    "_operations_by_depth",
    "_tracked",
    "_inbound_nodes",
    "_outbound_nodes",
    "_self_unconditional_checkpoint_dependencies",
}


class LayerReferences:
    """References from a parent layer to one sublayer: attributes, list slots and graph nodes."""

    def __init__(self, attributes, list_slots, nodes):
        self.attributes = attributes
        self.list_slots = list_slots
        self.nodes = nodes

    def __bool__(self):
        return bool(self.attributes or self.list_slots or self.nodes)


def find_references(parent, layer):
    """Return the attributes, list slots and graph nodes of `parent` that hold `layer`."""
    attributes = []
    list_slots = []
    for name, value in layer_attributes(parent).items():
        if name in _BOOKKEEPING_ATTRIBUTES or name.startswith("_keras_peft"):
            continue
        if value is layer:
            attributes.append(name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if item is layer:
                    list_slots.append((name, i))
    nodes = []
    if isinstance(parent, Functional):
        for depth_nodes in parent._nodes_by_depth.values():
            for node in depth_nodes:
                if node.operation is layer:
                    nodes.append(node)
    return LayerReferences(attributes, list_slots, nodes)


def _replace_by_id(items, old, new):
    for i, item in enumerate(items):
        if item is old:
            items[i] = new


def swap_layer(parent, old, new):
    """Make `parent` use `new` wherever it used `old`.

    Raises `ValueError` without changing anything when `parent` does not
    refer to `old`.
    """
    references = find_references(parent, old)
    if not references:
        raise ValueError(
            f"Layer {old.name!r} is tracked by {parent.name!r} but not stored in "
            "one of its attributes or graph nodes, so it cannot be replaced."
        )
    with unlocked_tracker(parent) as tracker:
        # Put `new` at `old`'s position in the tracked sublayers.
        store_name = "layers"
        if id(old) in tracker.stored_ids.get(store_name, set()):
            _replace_by_id(parent._layers, old, new)
            tracker.stored_ids[store_name].discard(id(old))
            tracker.stored_ids[store_name].add(id(new))
        for name in references.attributes:
            setattr(parent, name, new)
        for name, i in references.list_slots:
            container = layer_attributes(parent)[name]
            container[i] = new
        if references.nodes:
            for node in references.nodes:
                node.operation = new
            _replace_by_id(parent._operations, old, new)
            for operations in parent._operations_by_depth.values():
                _replace_by_id(operations, old, new)


@contextlib.contextmanager
def unlocked_tracker(layer):
    """Unlock the state tracker of a built `layer` for the block, then restore its lock."""
    tracker = layer._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield tracker
    finally:
        if was_locked:
            tracker.lock()


def track_variable(layer, variable):
    """Make a built `layer` track `variable`, as if the layer had created it."""
    with unlocked_tracker(layer):
        layer._track_variable(variable)


@contextlib.contextmanager
def name_scopes(parts):
    """Open one Keras name scope per item of `parts`, outermost first."""
    with contextlib.ExitStack() as stack:
        for part in parts:
            stack.enter_context(keras.name_scope(part))
        yield


def variable_scope_of(layer):
    """Open the Keras name scopes that `layer`'s variables were created in.

    New variables of a wrapper then get paths such as
    `transformer_layer_0/self_attention/query/lora_kernel_a` rather than a
    short path that repeats in every block.
    """
    weights = layer.weights
    parts = weights[0].path.split("/")[:-2] if weights else []
    return name_scopes(parts)
