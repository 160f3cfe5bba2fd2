"""`WrapEdit`: the edit that replaces a sublayer with a wrapper around it."""

from keras_peft.core.replace import swap_layer
from keras_peft.core.replace import variable_scope_of
from keras_peft.methods.base import Edit


class WrapEdit(Edit):
    """Replace the layer at `path` with `make_wrapper(layer)`, and back.

    Args:
        path: layer path of the wrapped layer; the wrapper takes the same path.
        parent: the layer that contains it.
        layer: the layer to wrap.
        make_wrapper: callable building the wrapper from `layer`. It runs in
            the name scope of `layer`'s variables, so the wrapper's new
            variables get unique paths.
        trainable_names: names of the wrapper's own variables that train.
    """

    def __init__(self, path, parent, layer, make_wrapper, trainable_names):
        super().__init__(path)
        self.parent = parent
        self.layer = layer
        self.make_wrapper = make_wrapper
        self.trainable_names = tuple(trainable_names)
        self.wrapper = None
        self._layer_trainable = layer.trainable

    def apply(self):
        with variable_scope_of(self.layer):
            wrapper = self.make_wrapper(self.layer)
        try:
            swap_layer(self.parent, self.layer, wrapper)
        except Exception:
            self._release(wrapper)
            raise
        self.wrapper = wrapper

    def _release(self, wrapper):
        wrapper.release_base_layer()
        self.layer.trainable = self._layer_trainable

    def undo(self):
        if self.wrapper is None:
            return
        swap_layer(self.parent, self.wrapper, self.layer)
        self._release(self.wrapper)
        self.wrapper = None

    def merge(self):
        if self.wrapper is None:
            return
        if hasattr(self.wrapper, "merge"):
            self.wrapper.merge()
        self.undo()

    def _own_variables(self):
        wrapper = self.wrapper
        return {v.name: v for v in wrapper._trainable_variables + wrapper._non_trainable_variables}

    def trainable_variables(self):
        own = self._own_variables()
        return [own[name] for name in self.trainable_names if name in own]

    def saved_variables(self):
        own = self._own_variables()
        return {name: own[name] for name in self.trainable_names if name in own}
