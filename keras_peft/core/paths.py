"""Layer paths: a name for every layer of a model, stable across instances.

A path joins layer names from the model root, which itself is left out:
`gpt2_backbone/transformer_layer_0/self_attention/query`. Keras makes
automatic names unique per process (`dense`, then `dense_1` in the next model
built), so a name that Keras generated from the class name is replaced by the
class name numbered by its position among same-class siblings. Two models
built the same way therefore give the same paths, which is what adapter files
need.
"""

import dataclasses
import re

import keras

try:
    from keras.src.utils.naming import to_snake_case
except ImportError:  # pragma: no cover - fallback for a moved private helper

    def to_snake_case(name):
        name = re.sub(r"\W+", "", name)
        name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
        return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


@dataclasses.dataclass(eq=False)
class LayerEntry:
    """One layer of a model and where it hangs.

    Attributes:
        path: canonical path from the model root (root excluded).
        layer: the layer object.
        parent: the layer whose tracked sublayers contain it (None for the root).
        position: child indices from the root, e.g. `(0, 4, 1)`.
    """

    path: str
    layer: keras.layers.Layer
    parent: keras.layers.Layer | None
    position: tuple


def _is_generated_name(layer):
    base = to_snake_case(type(layer).__name__)
    return re.fullmatch(re.escape(base) + r"(_\d+)?", layer.name) is not None, base


def _child_segments(children):
    """Return the path segment of each child, in order."""
    segments = []
    used = set()
    class_counts = {}
    for child in children:
        # A keras_peft wrapper takes the place, and so the path, of its base layer.
        if getattr(child, "_keras_peft_wrapper", False):
            child = child.base_layer
        generated, base = _is_generated_name(child)
        if generated:
            count = class_counts.get(base, 0)
            class_counts[base] = count + 1
            segment = base if count == 0 else f"{base}_{count}"
        else:
            segment = child.name
        # Explicit names can repeat inside a subclassed layer; number repeats.
        unique = segment
        suffix = 1
        while unique in used:
            unique = f"{segment}#{suffix}"
            suffix += 1
        used.add(unique)
        segments.append(unique)
    return segments


def sublayers(layer):
    """Return the tracked direct sublayers of `layer`, inputs excluded."""
    return [
        child
        for child in getattr(layer, "_layers", [])
        if isinstance(child, keras.layers.Layer) and not isinstance(child, keras.layers.InputLayer)
    ]


class LayerIndex:
    """All layers of a model by canonical path, in a depth-first order.

    A layer reachable from several parents (shared weights) is listed once,
    under the first path found.
    """

    def __init__(self, model):
        self.model = model
        self.entries = []
        self._by_path = {}
        self._by_id = {}
        self._walk(model, parent=None, path="", position=())

    def _walk(self, layer, parent, path, position):
        if id(layer) in self._by_id:
            return
        entry = LayerEntry(path=path, layer=layer, parent=parent, position=position)
        self._by_id[id(layer)] = entry
        if layer is not self.model:
            self.entries.append(entry)
            self._by_path[path] = entry
        children = sublayers(layer)
        for index, (child, segment) in enumerate(zip(children, _child_segments(children))):
            child_path = f"{path}/{segment}" if path else segment
            self._walk(child, parent=layer, path=child_path, position=position + (index,))

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def get(self, path):
        return self._by_path.get(path)

    def entry_of(self, layer):
        """Return the entry of a layer object, or None if it is not in the model."""
        return self._by_id.get(id(layer))

    def path_of(self, layer):
        entry = self._by_id.get(id(layer))
        return None if entry is None else entry.path

    def by_position(self, position):
        for entry in self.entries:
            if entry.position == tuple(position):
                return entry
        return None

    def paths(self):
        return [entry.path for entry in self.entries]

    def owned_variables(self, entry):
        """Return the variables created by this layer itself, not by sublayers."""
        layer = entry.layer
        return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def variable_key(layer_path, variable):
    """Key of a variable in adapter files: its layer path and its short name."""
    return f"{layer_path}/{variable.name}"
