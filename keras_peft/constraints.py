"""Keeping a weight near its pretrained value: `DiffConstraint` and `DiffPenalty`.

Diff tuning trains a weight W but keeps it close to its pretrained value
W_0. Two Keras mechanisms do this on an existing variable, without changing
any layer:

- `variable.constraint = DiffConstraint(reference, epsilon)`: the optimizer
  calls the constraint after each update (on every backend, inside a
  `jit_compile`d train step too), and it projects W back into the ball
  ‖W − W_0‖ ≤ ε.
- `variable.regularizer = DiffPenalty(reference, strength)`: `Layer.losses`
  adds λ‖W − W_0‖ for every trainable variable that has a regularizer, so
  `fit` minimises the task loss plus the penalty.

The norm is taken over the whole tensor: the Frobenius (L2) norm by default,
or the largest absolute entry (`norm="linf"`).

The reference W_0 is a non-trainable `keras.Variable`: see `DiffConstraint`
for where it lives.
"""

import numbers

import keras
from keras import ops

from keras_peft.core.step_state import current_value

NORMS = ("l2", "linf")


def check_norm(norm):
    """Return `norm` if it names a supported norm; raise `ValueError` otherwise."""
    if norm not in NORMS:
        raise ValueError(
            f"Unknown norm {norm!r}. Use 'l2' (the Frobenius norm of the whole "
            f"tensor) or 'linf' (its largest absolute entry). Received: norm={norm!r}"
        )
    return norm


def check_epsilon(epsilon):
    """Raise `ValueError` unless `epsilon` is a finite number greater than 0."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, numbers.Real)
        or not 0 < epsilon < float("inf")
    ):
        raise ValueError(
            "`epsilon` must be a finite number greater than 0: the radius of the "
            "ball ‖W − W_0‖ ≤ epsilon that each weight is kept in. "
            f"Received: epsilon={epsilon!r}"
        )


def check_strength(strength, name="strength"):
    """Raise `ValueError` unless `strength` is a finite number ≥ 0."""
    if (
        isinstance(strength, bool)
        or not isinstance(strength, numbers.Real)
        or not 0 <= strength < float("inf")
    ):
        raise ValueError(
            f"`{name}` must be a finite number ≥ 0: the weight λ of the penalty "
            f"λ‖W − W_0‖ added to the loss (0 disables it). Received: {name}={strength!r}"
        )


def difference_norm(difference, norm="l2"):
    """Return the norm of a whole tensor, with a finite gradient at zero.

    For `"l2"` this is sqrt(Σ d²). Its derivative d / ‖d‖ is 0 / 0 at d = 0,
    which is where diff tuning starts (W = W_0), so a plain `sqrt` would put
    NaN into the first gradient. The square root is therefore only evaluated
    on a positive argument (1 replaces 0), and the result for a zero tensor
    is selected by `where`: the value is exactly ‖d‖ everywhere, and the
    gradient at d = 0 is 0, the smallest subgradient of the norm there.

    For `"linf"` this is max |d|, whose gradient is finite everywhere. At
    d = 0 the backends pick different subgradients (JAX takes the
    derivative of |x| at 0 as 1 and splits the max among ties, which would
    push W away from W_0), so the same `where` selects 0 there and the
    gradient at d = 0 is 0 on every backend.

    Args:
        difference: a tensor d = W − W_0 of any shape.
        norm: `"l2"` or `"linf"`. Defaults to `"l2"`.

    Returns:
        A scalar tensor of the difference's dtype.
    """
    if norm == "linf":
        largest = ops.max(ops.abs(difference))
        return ops.where(ops.greater(largest, 0), largest, ops.zeros_like(largest))
    squared = ops.sum(ops.square(difference))
    positive = ops.greater(squared, 0)
    safe = ops.where(positive, squared, ops.ones_like(squared))
    return ops.where(positive, ops.sqrt(safe), ops.zeros_like(squared))


def _reference_value(reference, dtype):
    value = current_value(reference)
    if value is None:
        if isinstance(reference, keras.Variable) and getattr(reference, "_value", 0) is None:
            # Keras' JAX trainer empties model variables while `fit` runs.
            raise RuntimeError(
                f"The reference W_0 ({reference.path}) has no value here: Keras' JAX "
                "trainer keeps it in the state of the train step, and keras_peft "
                "reads it there only for the model that keras_peft.DiffTuning was "
                "applied to. On JAX, apply DiffTuning to the model you call fit on "
                "(for a KerasHub task, the task rather than its backbone)."
            )
        # On JAX, a keras.Variable must be converted before `where` and `cast`.
        value = ops.convert_to_tensor(reference)
    return ops.cast(value, dtype)


def _no_config(cls):
    raise ValueError(
        f"A {cls.__name__} holds its reference weight W_0, which a config cannot "
        f"store, so it cannot be rebuilt from a config. Create it with "
        f"{cls.__name__}(reference, ...) or apply keras_peft.DiffTuning(...) again."
    )


class DiffConstraint(keras.constraints.Constraint):
    """Project a weight back into the ball ‖W − W_0‖ ≤ ε after each update.

    With d = W − W_0, the projection is

    - `norm="l2"`: W_0 + d · ε / ‖d‖_F when ‖d‖_F > ε, else W unchanged;
    - `norm="linf"`: W_0 + clip(d, −ε, ε), applied entry by entry.

    Both are the Euclidean projection onto the ball of that norm. A weight
    already inside the ball is returned bit for bit, so the constraint adds
    no rounding drift.

    Set it on an existing variable before `compile`: Keras' optimizers call
    `variable.constraint` after every update on TensorFlow, JAX (inside the
    stateless, jitted step too) and PyTorch.

    The reference W_0 is a non-trainable `keras.Variable`, and
    `keras_peft.DiffTuning` makes the model track it. W_0 is therefore stored
    once, is not trainable and gets no optimizer slots. A compiled train step
    receives it as an argument, like any other model variable. Keras 3.15's
    JAX trainer runs the optimizer step, where constraints run, in a
    stateless scope that contains only the trainable and optimizer
    variables. On JAX the constraint therefore reads W_0 from the values the
    train step received (`keras_peft.core.step_state`). A reference that no layer tracks works
    on every backend too, but a jitted JAX train step then bakes it into the
    compiled program as a constant: a second copy.

    Args:
        reference: the pretrained value W_0, a `keras.Variable` or tensor of
            the weight's shape.
        epsilon: float > 0, the radius ε of the ball.
        norm: `"l2"` (Frobenius norm of the whole tensor) or `"linf"`
            (largest absolute entry). Defaults to `"l2"`.

    Example:

    >>> import numpy as np
    >>> reference = keras.Variable(np.zeros((2,), "float32"), trainable=False)
    >>> constraint = DiffConstraint(reference, epsilon=1.0)
    >>> np.round(keras.ops.convert_to_numpy(constraint(np.array([3.0, 4.0], "float32"))), 3)
    array([0.6, 0.8], dtype=float32)
    """

    def __init__(self, reference, epsilon, norm="l2"):
        check_epsilon(epsilon)
        self.reference = reference
        self.epsilon = float(epsilon)
        self.norm = check_norm(norm)

    def __call__(self, w):
        w = ops.convert_to_tensor(w)
        reference = _reference_value(self.reference, w.dtype)
        difference = ops.subtract(w, reference)
        epsilon = ops.cast(self.epsilon, w.dtype)
        if self.norm == "linf":
            clipped = ops.add(reference, ops.clip(difference, -epsilon, epsilon))
            return ops.where(ops.greater(ops.abs(difference), epsilon), clipped, w)
        distance = difference_norm(difference, "l2")
        scale = ops.divide(epsilon, ops.maximum(distance, epsilon))
        projected = ops.add(reference, ops.multiply(difference, scale))
        return ops.where(ops.greater(distance, epsilon), projected, w)

    def get_config(self):
        """Return `epsilon` and `norm`; the reference W_0 is not part of the config."""
        return {"epsilon": self.epsilon, "norm": self.norm}

    @classmethod
    def from_config(cls, config):
        _no_config(cls)

    def __repr__(self):
        return f"DiffConstraint(epsilon={self.epsilon}, norm={self.norm!r})"


class DiffPenalty(keras.regularizers.Regularizer):
    """The loss term λ‖W − W_0‖ that pulls a weight towards its pretrained value.

    Set it as `variable.regularizer` on a trainable variable: `Layer.losses`
    (and so `fit`) adds it to the loss. The norm is computed by
    `difference_norm`, so the penalty and its gradient are finite at
    W = W_0, where training starts; there the gradient is 0.

    Args:
        reference: the pretrained value W_0, a `keras.Variable` or tensor of
            the weight's shape (see `DiffConstraint` for where it lives).
        strength: float ≥ 0, the factor λ.
        norm: `"l2"` or `"linf"`, as in `DiffConstraint`. Defaults to `"l2"`.

    Example:

    >>> import numpy as np
    >>> reference = keras.Variable(np.zeros((2,), "float32"), trainable=False)
    >>> penalty = DiffPenalty(reference, strength=0.5)
    >>> float(penalty(np.array([3.0, 4.0], "float32")))
    2.5
    """

    def __init__(self, reference, strength, norm="l2"):
        check_strength(strength)
        self.reference = reference
        self.strength = float(strength)
        self.norm = check_norm(norm)

    def __call__(self, x):
        x = ops.convert_to_tensor(x)
        difference = ops.subtract(x, _reference_value(self.reference, x.dtype))
        return ops.multiply(ops.cast(self.strength, x.dtype), difference_norm(difference, self.norm))

    def get_config(self):
        """Return `strength` and `norm`; the reference W_0 is not part of the config."""
        return {"strength": self.strength, "norm": self.norm}

    @classmethod
    def from_config(cls, config):
        _no_config(cls)

    def __repr__(self):
        return f"DiffPenalty(strength={self.strength}, norm={self.norm!r})"
