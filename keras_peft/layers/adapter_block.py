"""`AdapterBlock`: a bottleneck adapter, and `AdapterWrapper`, which adds one after a layer."""

import keras
from keras import ops

from keras_peft.core.validation import check_rank
from keras_peft.layers.base import build_base_layer

# Public functions of `keras.activations` that are not activations.
_NOT_ACTIVATIONS = {"get", "serialize", "deserialize"}
# Activations that do not map the bottleneck to a tensor of the same shape:
# `glu` halves the last axis and `threshold` needs two more arguments.
_SHAPE_CHANGING_ACTIVATIONS = {"glu", "threshold"}


def activation_names():
    """Return the sorted Keras activation names an adapter accepts."""
    return sorted(
        name
        for name in dir(keras.activations)
        if not name.startswith("_")
        and name not in _NOT_ACTIVATIONS
        and name not in _SHAPE_CHANGING_ACTIVATIONS
        and callable(getattr(keras.activations, name))
    )


def check_activation_name(activation):
    """Raise `ValueError` unless `activation` is an accepted activation name."""
    valid = activation_names()
    if not isinstance(activation, str) or activation not in valid:
        raise ValueError(
            f"Unknown adapter activation {activation!r}. Use one of the Keras "
            f"activation names: {', '.join(valid)}. Received: activation={activation!r}"
        )


def _get_activation(activation):
    if isinstance(activation, str):
        check_activation_name(activation)
        return keras.activations.get(activation)
    if isinstance(activation, dict):
        # A serialised custom activation, as `get_config` writes it.
        return keras.activations.get(activation)
    if callable(activation):
        return activation
    raise ValueError(
        "`activation` must be a Keras activation name or a callable. Valid names: "
        f"{', '.join(activation_names())}. Received: activation={activation!r}"
    )


@keras.saving.register_keras_serializable(package="keras_peft")
class AdapterBlock(keras.layers.Layer):
    """Bottleneck adapter: a small residual MLP on the last axis.

    With d the size of the last input axis and r the bottleneck size, the
    block computes

        Adapter(x) = x + W_up · act(W_down · x + b_down) + b_up

    where W_down is r × d, b_down has r entries, W_up is d × r and b_up has
    d entries. The two matrices are stored transposed as Keras kernels
    (`down_kernel` is d × r and `up_kernel` is r × d). The block trains
    `2·d·r + r + d` parameters. W_up and b_up start at zero, so the
    block first returns its input exactly. W_down starts from
    `down_initializer` (He initialisation by default, which suits ReLU) and
    b_down from zero.

    The weights are created with the variable dtype of the dtype policy, so
    they stay float32 under `mixed_float16` and `mixed_bfloat16`; the
    computation runs in the compute dtype.

    Args:
        bottleneck: int > 0, the bottleneck size r. Must not exceed d.
        activation: the nonlinearity between the projections, a Keras
            activation name (`"relu"`, `"gelu"`, `"silu"`, ...) or a callable.
            `"glu"` and `"threshold"` are rejected because they do not keep
            the shape. Defaults to `"relu"`.
        down_initializer: initializer of W_down. Defaults to `"he_uniform"`.
        up_initializer: initializer of W_up. Defaults to `"zeros"`; any other
            value makes the block differ from the identity at start.
        **kwargs: base layer keyword arguments such as `name` and `dtype`.

    Call arguments:
        inputs: a tensor of shape `(..., d)`.

    Returns:
        A tensor of the same shape and dtype as `inputs`.

    Example:

    >>> inputs = keras.Input((10, 32))
    >>> outputs = AdapterBlock(bottleneck=4)(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> model.count_params()  # 2·32·4 + 4 + 32
    292

    References:
        Houlsby et al., "Parameter-Efficient Transfer Learning for NLP",
        ICML 2019.
    """

    def __init__(
        self,
        bottleneck,
        activation="relu",
        down_initializer="he_uniform",
        up_initializer="zeros",
        **kwargs,
    ):
        check_rank(bottleneck, "bottleneck")
        super().__init__(**kwargs)
        self.bottleneck = int(bottleneck)
        self.activation = _get_activation(activation)
        self.down_initializer = keras.initializers.get(down_initializer)
        self.up_initializer = keras.initializers.get(up_initializer)
        self.hidden_size = None

    def build(self, input_shape):
        self._build_adapter(input_shape[-1])

    def _build_adapter(self, hidden_size):
        if hidden_size is None:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} needs a known size of the last "
                "input axis to create its weights."
            )
        hidden_size = int(hidden_size)
        if self.bottleneck > hidden_size:
            raise ValueError(
                f"The adapter bottleneck must not be larger than the hidden size "
                f"d={hidden_size} of layer {self.name!r}; use a bottleneck between 1 "
                f"and {hidden_size}. Received: bottleneck={self.bottleneck}"
            )
        self.hidden_size = hidden_size
        self.down_kernel = self.add_weight(
            name="down_kernel",
            shape=(hidden_size, self.bottleneck),
            initializer=self.down_initializer,
        )
        self.down_bias = self.add_weight(
            name="down_bias",
            shape=(self.bottleneck,),
            initializer="zeros",
        )
        self.up_kernel = self.add_weight(
            name="up_kernel",
            shape=(self.bottleneck, hidden_size),
            initializer=self.up_initializer,
        )
        self.up_bias = self.add_weight(
            name="up_bias",
            shape=(hidden_size,),
            initializer="zeros",
        )
        self.built = True

    def adapt(self, x):
        """Return `x + W_up · act(W_down · x + b_down) + b_up` for a tensor `x`."""
        dtype = keras.backend.standardize_dtype(x.dtype)
        down_kernel = ops.cast(self.down_kernel, dtype)
        down_bias = ops.cast(self.down_bias, dtype)
        up_kernel = ops.cast(self.up_kernel, dtype)
        up_bias = ops.cast(self.up_bias, dtype)

        hidden = self.activation(ops.matmul(x, down_kernel) + down_bias)
        return x + (ops.matmul(hidden, up_kernel) + up_bias)

    def call(self, inputs):
        return self.adapt(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "bottleneck": self.bottleneck,
                "activation": keras.activations.serialize(self.activation),
                "down_initializer": keras.initializers.serialize(self.down_initializer),
                "up_initializer": keras.initializers.serialize(self.up_initializer),
            }
        )
        return config


def output_size(layer):
    """Return the size of the last axis of a built layer's output.

    The size comes from `compute_output_shape` of the input shape the layer
    was built with, so any layer that implements it works. `Dense` and
    `EinsumDense` are also read from their arguments. Raises `ValueError`
    when the size is unknown.
    """
    build_config = layer.get_build_config() or {}
    input_shape = build_config.get("input_shape")
    size = None
    if input_shape is not None:
        try:
            output_shape = layer.compute_output_shape(input_shape)
        except Exception:  # noqa: BLE001 - custom layers raise anything here
            output_shape = None
        if isinstance(output_shape, (tuple, list)) and output_shape and isinstance(output_shape[-1], int):
            size = output_shape[-1]
    if size is None and isinstance(layer, keras.layers.Dense):
        size = layer.units
    if size is None and isinstance(layer, keras.layers.EinsumDense):
        partial = layer.partial_output_shape
        if partial and isinstance(partial[-1], int):
            size = partial[-1]
    if size is None:
        raise ValueError(
            f"The output size of layer {layer.name!r} ({type(layer).__name__}) is "
            "unknown, so no adapter can be sized for it. Adapters go after layers "
            "that return one tensor whose last axis has a fixed size, such as "
            "Dense and EinsumDense."
        )
    return int(size)


@keras.saving.register_keras_serializable(package="keras_peft")
class AdapterWrapper(AdapterBlock):
    """A layer followed by a bottleneck adapter on its output.

    Computes `y = base_layer(inputs)` and returns `Adapter(y)` (see
    `AdapterBlock`), with d the size of the last axis of y. `keras_peft.apply`
    with `keras_peft.Adapter` puts these wrappers around the attention output
    projection and the feed-forward output projection of transformer blocks,
    which places each adapter on a sublayer's output before the residual add.

    The base layer is frozen (`trainable=False`) and otherwise untouched, so
    `release_base_layer` returns it as it was.

    Args:
        base_layer: a layer that returns one tensor whose last axis has a
            fixed size, usually a `Dense` or `EinsumDense`.
        bottleneck: int > 0, the bottleneck size r; at most d.
        activation: see `AdapterBlock`. Defaults to `"relu"`.
        down_initializer: see `AdapterBlock`. Defaults to `"he_uniform"`.
        up_initializer: see `AdapterBlock`. Defaults to `"zeros"`.
        **kwargs: base layer keyword arguments. The name and dtype policy
            default to the base layer's.

    Call arguments:
        inputs: the input of the base layer; further positional and keyword
            arguments are passed to the base layer as they are.

    Returns:
        A tensor with the base layer's output shape.

    Example:

    >>> inputs = keras.Input((16,))
    >>> outputs = AdapterWrapper(keras.layers.Dense(8), bottleneck=2)(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> [w.name for w in model.trainable_weights]
    ['down_kernel', 'down_bias', 'up_kernel', 'up_bias']
    """

    # Marks keras_peft wrappers: layer paths look through them to the base layer.
    _keras_peft_wrapper = True

    def __init__(self, base_layer, bottleneck, activation="relu", **kwargs):
        if not isinstance(base_layer, keras.layers.Layer):
            raise TypeError(
                "AdapterWrapper wraps a Keras layer. Received: "
                f"base_layer={base_layer!r} of type {type(base_layer).__name__}"
            )
        if isinstance(base_layer, AdapterWrapper):
            raise ValueError(
                f"Layer {base_layer.name!r} already has an adapter; wrap the original "
                "layer once."
            )
        kwargs.setdefault("name", base_layer.name)
        kwargs.setdefault("dtype", base_layer.dtype_policy)
        super().__init__(bottleneck=bottleneck, activation=activation, **kwargs)
        self.base_layer = base_layer
        self.base_layer.trainable = False
        if base_layer.built:
            self.build(None)

    def build(self, input_shape=None):
        if self.built:
            return
        build_base_layer(self, input_shape)
        self._build_adapter(output_size(self.base_layer))

    def call(self, inputs, *args, **kwargs):
        outputs = self.base_layer(inputs, *args, **kwargs)
        return self.adapt(outputs)

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    def get_build_config(self):
        return {"base_layer": self.base_layer.get_build_config()}

    def build_from_config(self, config):
        base_build_config = (config or {}).get("base_layer")
        if base_build_config and not self.base_layer.built:
            self.base_layer.build_from_config(base_build_config)
        self.build(None)

    def release_base_layer(self):
        """Return the base layer. The wrapper must not be called after this."""
        return self.base_layer

    def get_config(self):
        config = super().get_config()
        base_config = keras.layers.serialize(self.base_layer)
        # The wrapper freezes its base layer itself; store it as trainable so
        # that loading and wrapping again gives the same state.
        base_config["config"]["trainable"] = True
        config["base_layer"] = base_config
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base_layer = keras.layers.deserialize(config.pop("base_layer"))
        return cls(base_layer, **config)
