"""`LoRADense`: low-rank adaptation of a `Dense` or `EinsumDense` layer."""

import math
import string

import keras
from keras import ops

from keras_peft.core.validation import check_alpha
from keras_peft.core.validation import check_dropout
from keras_peft.core.validation import check_rank
from keras_peft.layers.base import build_base_layer


def _einsum_plan(equation):
    """Split an `EinsumDense` equation into the two LoRA contractions.

    The kernel letters that appear in the input are contracted by A; the
    kernel letters that appear in the output are produced by B. Returns a
    dict with the equations for `x·A`, `(x·A)·B` and for the merged kernel
    delta, plus the kernel axes that belong to A and to B.
    """
    inputs_and_kernel, output_spec = equation.split("->")
    input_spec, kernel_spec = inputs_and_kernel.split(",")
    letters = set(equation) - set(",->.")
    rank_letter = next(c for c in reversed(string.ascii_letters) if c not in letters)

    contracted = [c for c in kernel_spec if c in input_spec and c not in output_spec]
    produced = [c for c in kernel_spec if c in output_spec and c not in input_spec]
    if len(contracted) + len(produced) != len(kernel_spec) or "." in kernel_spec:
        raise NotImplementedError(
            "LoRADense supports EinsumDense equations whose kernel axes are "
            "either contracted with the input or copied to the output. "
            f"Received: equation={equation!r}"
        )
    middle_spec = "".join(c for c in input_spec if c not in contracted) + rank_letter
    a_spec = "".join(contracted) + rank_letter
    b_spec = rank_letter + "".join(produced)
    contracted_spec = "".join(contracted)
    produced_spec = "".join(produced)
    # A "flat" equation contracts the trailing input axes and appends the
    # produced axes in kernel order, as every KerasHub q/k/v/o projection
    # does. Then x·A and (x·A)·B are plain matrix products on the flattened
    # trailing axes, and eager backends run those with fewer ops than einsum.
    flat = (
        bool(contracted_spec)
        and bool(produced_spec)
        and input_spec.endswith(contracted_spec)
        and output_spec.endswith(produced_spec)
        and input_spec[: -len(contracted_spec)] == output_spec[: -len(produced_spec)]
    )
    return {
        "down": f"{input_spec},{a_spec}->{middle_spec}",
        "up": f"{middle_spec},{b_spec}->{output_spec}",
        "delta": f"{a_spec},{b_spec}->{kernel_spec}",
        "a_axes": [kernel_spec.index(c) for c in contracted],
        "b_axes": [kernel_spec.index(c) for c in produced],
        "flat": flat,
    }


@keras.saving.register_keras_serializable(package="keras_peft")
class LoRADense(keras.layers.Layer):
    """Low-rank adaptation (LoRA) of a `Dense` or `EinsumDense` layer.

    The wrapped layer keeps its pretrained kernel W frozen and a trainable
    low-rank update is added to its output:

        y = act(W x + b + (alpha / rank) · B A x)

    A maps the kernel's input axes (d values in all) to `rank`, and B maps
    `rank` to the kernel's output axes (k values in all), so the update has
    `rank · (d + k)` parameters. For the `(hidden, heads, head_dim)` query
    kernel of a KerasHub attention layer, A is `hidden × rank` and B is
    `rank × (heads · head_dim)`, as in the LoRA paper. A starts from
    `lora_a_initializer` and B from zeros, so the layer first computes
    exactly what the base layer computes.

    The update is computed as `(x A) B`, never as `W + B A`, so a training
    step costs two thin matrix products and no `d × k` matrix. The
    activation of the base layer moves to this wrapper while it is wrapped
    (the update must be added before the activation) and is given back by
    `keras_peft.remove` and `keras_peft.merge`.

    A and B are created with the variable dtype of the dtype policy, so they
    stay float32 under `mixed_float16` and `mixed_bfloat16`.

    Args:
        base_layer: a `keras.layers.Dense` or `keras.layers.EinsumDense`.
            Its variables are frozen (`trainable=False`).
        rank: int > 0, the rank r of the update, at most the smaller of the
            kernel's input and output sizes. Defaults to `8`.
        alpha: float > 0; the update is scaled by `alpha / rank`. Defaults
            to `None`, which means `alpha = rank` (scale 1).
        dropout: float in [0, 1), dropout applied to the input of the LoRA
            path only. Defaults to `0.0`.
        lora_a_initializer: initializer of A. Defaults to `"he_uniform"`.
        lora_b_initializer: initializer of B. Defaults to `"zeros"`; any
            other value makes the layer differ from its base at start.
        **kwargs: base layer keyword arguments such as `name` and `dtype`.
            The name and dtype policy default to the base layer's.

    Call arguments:
        inputs: the input of the base layer.
        training: Python bool, whether dropout is active.

    Returns:
        A tensor with the base layer's output shape.

    Example:

    >>> inputs = keras.Input((16,))
    >>> outputs = LoRADense(keras.layers.Dense(4), rank=2)(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> [w.name for w in model.trainable_weights]
    ['lora_kernel_a', 'lora_kernel_b']

    References:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
        ICLR 2022.
    """

    # Marks keras_peft wrappers: layer paths look through them to the base layer.
    _keras_peft_wrapper = True

    def __init__(
        self,
        base_layer,
        rank=8,
        alpha=None,
        dropout=0.0,
        lora_a_initializer="he_uniform",
        lora_b_initializer="zeros",
        **kwargs,
    ):
        if not isinstance(base_layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            raise TypeError(
                "LoRADense wraps a keras.layers.Dense or keras.layers.EinsumDense. "
                f"Received: base_layer={base_layer!r} of type {type(base_layer).__name__}"
            )
        check_rank(rank)
        alpha = float(rank) if alpha is None else alpha
        check_alpha(alpha)
        check_dropout(dropout)
        kwargs.setdefault("name", base_layer.name)
        kwargs.setdefault("dtype", base_layer.dtype_policy)
        super().__init__(**kwargs)

        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.dropout = float(dropout)
        self.lora_a_initializer = keras.initializers.get(lora_a_initializer)
        self.lora_b_initializer = keras.initializers.get(lora_b_initializer)

        if isinstance(base_layer, keras.layers.EinsumDense):
            self._plan = _einsum_plan(base_layer.equation)
        else:
            self._plan = None

        # The update must be added before the nonlinearity, so the wrapper
        # applies the base layer's activation itself. `Dense.call` and
        # `EinsumDense.call` skip their activation when it is None.
        activation = base_layer.activation
        if activation is keras.activations.linear:
            activation = None
        self.activation = activation
        base_layer.activation = None

        self.base_layer = base_layer
        self.base_layer.trainable = False
        if self.dropout > 0:
            self.dropout_layer = keras.layers.Dropout(self.dropout, name="lora_dropout")
        else:
            self.dropout_layer = None
        if base_layer.built:
            self.build(None)

    def _factor_shapes(self):
        kernel_shape = tuple(self.base_layer.kernel.shape)
        if self._plan is None:
            return (kernel_shape[0], self.rank), (self.rank, kernel_shape[1])
        a_dims = [kernel_shape[i] for i in self._plan["a_axes"]]
        b_dims = [kernel_shape[i] for i in self._plan["b_axes"]]
        return (math.prod(a_dims), self.rank), (self.rank, math.prod(b_dims))

    def build(self, input_shape=None):
        if self.built:
            return
        build_base_layer(self, input_shape)
        if self.dropout_layer is not None:
            self.dropout_layer.build(input_shape)
        a_shape, b_shape = self._factor_shapes()
        if self.rank > min(a_shape[0], b_shape[1]):
            raise ValueError(
                f"`rank` must be at most min(inputs, outputs) = "
                f"{min(a_shape[0], b_shape[1])} for layer {self.name!r}, whose kernel "
                f"maps {a_shape[0]} values to {b_shape[1]}; a larger rank adds "
                f"parameters without adding expressiveness. Received: rank={self.rank}"
            )
        self.lora_kernel_a = self.add_weight(
            name="lora_kernel_a",
            shape=a_shape,
            initializer=self.lora_a_initializer,
        )
        self.lora_kernel_b = self.add_weight(
            name="lora_kernel_b",
            shape=b_shape,
            initializer=self.lora_b_initializer,
        )
        # 1.0 once the update is folded into the kernel. A variable rather than
        # a Python flag, so functions that were traced before `merge` (such as
        # a model's compiled predict step) follow the change.
        self.lora_merged = self.add_weight(
            name="lora_merged",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="float32",
        )
        self.built = True

    def _factors(self):
        """Return A and B reshaped to the kernel's axes (no copy of W)."""
        a = self.lora_kernel_a
        b = self.lora_kernel_b
        if self._plan is None:
            return a, b
        kernel_shape = tuple(self.base_layer.kernel.shape)
        a_dims = tuple(kernel_shape[i] for i in self._plan["a_axes"])
        b_dims = tuple(kernel_shape[i] for i in self._plan["b_axes"])
        return ops.reshape(a, a_dims + (self.rank,)), ops.reshape(b, (self.rank,) + b_dims)

    def call(self, inputs, training=None):
        outputs = self.base_layer(inputs)
        x = inputs
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        flat = self._plan is None or self._plan["flat"]
        if flat:
            a, b = self.lora_kernel_a, self.lora_kernel_b
        else:
            a, b = self._factors()
        a = ops.cast(a, self.compute_dtype)
        b = ops.cast(b, self.compute_dtype)
        # After `merge` the kernel already contains the update, so it is scaled by 0.
        scale = ops.cast(self.scaling * (1.0 - self.lora_merged), self.compute_dtype)
        if flat:
            # Fold every leading axis into one, so both products are 2-D matmuls.
            # On TensorFlow a 3-D × 2-D matmul becomes a tensordot whose training
            # graph has about twice the ops, and each op of a traced step costs memory.
            x = ops.reshape(x, (-1, self.lora_kernel_a.shape[0]))
            low = ops.matmul(x, a)
            delta = ops.matmul(low * scale, b)
            delta = ops.reshape(delta, ops.shape(outputs))
        else:
            low = ops.einsum(self._plan["down"], x, a)
            delta = ops.einsum(self._plan["up"], low * scale, b)
        outputs = outputs + ops.cast(delta, outputs.dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    @property
    def merged(self):
        """Whether the update is currently folded into the base kernel."""
        return bool(ops.convert_to_numpy(self.lora_merged) > 0.5)

    def get_build_config(self):
        return {"base_layer": self.base_layer.get_build_config()}

    def build_from_config(self, config):
        base_build_config = (config or {}).get("base_layer")
        if base_build_config and not self.base_layer.built:
            self.base_layer.build_from_config(base_build_config)
        self.build(None)

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    def delta_kernel(self):
        """Return `(alpha / rank) · B A` in the shape and axis order of the kernel."""
        a, b = self._factors()
        if self._plan is None:
            delta = ops.matmul(a, b)
        else:
            delta = ops.einsum(self._plan["delta"], a, b)
        return ops.cast(delta * self.scaling, self.base_layer.kernel.dtype)

    def _check_mergeable(self):
        if getattr(self.base_layer, "quantization_mode", None):
            raise NotImplementedError(
                f"LoRADense {self.name!r} cannot merge into a "
                f"{self.base_layer.quantization_mode}-quantized kernel; keep the "
                "adapter unmerged."
            )

    def merge(self):
        """Add the update to the base kernel and scale the LoRA path to zero.

        The output stays the same; compiled functions follow the change
        because the merged state is a variable. The low-rank path is still
        computed (times zero): for deployment, `keras_peft.merge(model)` puts
        the plain layers back instead. Raises `ValueError` without changing
        the kernel when the update has non-finite entries.
        """
        if self.merged:
            return
        self._check_mergeable()
        delta = self.delta_kernel()
        if not bool(ops.all(ops.isfinite(delta))):
            raise ValueError(
                f"LoRADense {self.name!r} has non-finite values in its update "
                "(NaN or inf); the kernel was left unchanged."
            )
        kernel = self.base_layer.kernel
        kernel.assign(kernel + delta)
        self.lora_merged.assign(1.0)

    def unmerge(self):
        """Subtract the update from the base kernel and compute it separately again."""
        if not self.merged:
            return
        kernel = self.base_layer.kernel
        kernel.assign(kernel - self.delta_kernel())
        self.lora_merged.assign(0.0)

    def release_base_layer(self):
        """Return the base layer with its activation given back.

        The wrapper must not be called after this.
        """
        self.base_layer.activation = (
            self.activation if self.activation is not None else keras.activations.linear
        )
        return self.base_layer

    def get_config(self):
        config = super().get_config()
        # Serialise the base layer as it was before wrapping: with its own
        # activation and trainable.
        held_activation = self.base_layer.activation
        self.base_layer.activation = self.activation or keras.activations.linear
        try:
            base_config = keras.layers.serialize(self.base_layer)
        finally:
            self.base_layer.activation = held_activation
        base_config["config"]["trainable"] = True
        config.update(
            {
                "base_layer": base_config,
                "rank": self.rank,
                "alpha": self.alpha,
                "dropout": self.dropout,
                "lora_a_initializer": keras.initializers.serialize(self.lora_a_initializer),
                "lora_b_initializer": keras.initializers.serialize(self.lora_b_initializer),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base_layer = keras.layers.deserialize(config.pop("base_layer"))
        return cls(base_layer, **config)
