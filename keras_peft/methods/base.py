"""Method objects and the edits they plan on a model.

A method object (`LoRA`, `Adapter`, ...) only describes what to do. Given a
model, `Method.plan` inspects it and returns a list of `Edit`s without
changing anything; every check that can fail runs there. `keras_peft.apply`
then performs the edits and can undo all of them if one fails, so a failed
`apply` leaves the model as it was.
"""

import keras
import numpy as np

_METHODS = {}


def variable_to_numpy(variable):
    """Return a variable's value as a contiguous NumPy array (bfloat16 as float32)."""
    array = np.asarray(keras.ops.convert_to_numpy(variable))
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)


def register_method(cls):
    """Class decorator: make a method class loadable from adapter files by its `kind`."""
    if cls.kind in _METHODS and _METHODS[cls.kind] is not cls:
        raise ValueError(f"A method of kind {cls.kind!r} is already registered.")
    _METHODS[cls.kind] = cls
    return cls


def method_from_config(config):
    """Rebuild a method object from `{"kind": ..., "config": {...}}`."""
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in _METHODS:
        raise ValueError(
            f"Unknown method kind {kind!r} in adapter config; known kinds: "
            f"{sorted(_METHODS)}. The adapter may need a newer keras_peft."
        )
    return _METHODS[kind].from_config(config.get("config", {}))


def serialize_method(method):
    return {"kind": method.kind, "config": method.get_config()}


class Method:
    """Base class of the method objects.

    Subclasses set `kind` (the name stored in adapter files) and implement
    `plan`, `get_config` and `from_config`.
    """

    kind = None

    def plan(self, model, index):
        """Return the list of `Edit`s this method makes on `model`, changing nothing."""
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class Edit:
    """One planned change of a model, at one layer path.

    Attributes:
        path: the layer path the edit changes; two edits on one path conflict
            unless `exclusive` is False.
        exclusive: whether another edit may touch the same path.
    """

    exclusive = True

    def __init__(self, path):
        self.path = path

    def apply(self):
        """Perform the edit."""
        raise NotImplementedError

    def undo(self):
        """Reverse `apply` exactly."""
        raise NotImplementedError

    def merge(self):
        """Fold the edit into the base weights and restore the plain layer.

        Defaults to `undo`, for edits that add nothing worth keeping.
        """
        self.undo()

    def trainable_variables(self):
        """Variables that train once the edit is applied."""
        return []

    def saved_variables(self):
        """`{name: variable}` stored in adapter files under `path/name`."""
        return {}

    def reference_variables(self):
        """Variables the edit adds that hold no model parameter (a copy of W_0, say).

        They are left out of the report's parameter counts.
        """
        return []

    def export_tensors(self):
        """`{name: NumPy array}` written to the adapter file under `path/name`.

        Defaults to the values of `saved_variables`. An edit that stores
        something other than a variable's value (a weight difference, say)
        overrides this together with `expected_shapes` and `import_tensors`.
        """
        return {name: variable_to_numpy(v) for name, v in self.saved_variables().items()}

    def expected_shapes(self):
        """`{name: shape}` that `import_tensors` accepts; checked before loading."""
        return {name: tuple(v.shape) for name, v in self.saved_variables().items()}

    def import_tensors(self, tensors):
        """Load `{name: NumPy array}` read from an adapter file (shapes already checked)."""
        variables = self.saved_variables()
        for name, array in tensors.items():
            variables[name].assign(array)

    def layer_count(self):
        """Return how many layers the edit adapts, for the report."""
        return 1
