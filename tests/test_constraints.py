import math

import keras
import numpy as np
import pytest

from keras_peft.constraints import DiffConstraint
from keras_peft.constraints import DiffPenalty
from keras_peft.constraints import difference_norm
from tiny_models import to_numpy

EPSILON = 0.5


def reference_variable(value):
    return keras.Variable(np.asarray(value, "float32"), trainable=False)


def numpy_projection(w, w0, epsilon, norm):
    """The projection onto {W : ‖W − W_0‖ ≤ ε}, written with NumPy."""
    d = w - w0
    if norm == "linf":
        return w0 + np.clip(d, -epsilon, epsilon)
    n = np.linalg.norm(d)
    return w if n <= epsilon else w0 + d * (epsilon / n)


def numpy_norm(d, norm):
    return np.max(np.abs(d)) if norm == "linf" else np.linalg.norm(d)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_matches_numpy(norm):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype("float32")
    w = (w0 + rng.normal(size=(4, 3))).astype("float32")

    projected = to_numpy(DiffConstraint(reference_variable(w0), EPSILON, norm)(w))

    np.testing.assert_allclose(projected, numpy_projection(w, w0, EPSILON, norm), atol=1e-6)
    # float32 rounding of W_0 + d leaves the distance within 1e-6 of ε.
    assert numpy_norm(projected - w0, norm) <= EPSILON + 1e-6


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_weight_inside_ball_is_returned_unchanged(norm):
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(5,)).astype("float32")
    w = (w0 + 0.01 * rng.normal(size=(5,))).astype("float32")

    projected = to_numpy(DiffConstraint(reference_variable(w0), EPSILON, norm)(w))

    np.testing.assert_array_equal(projected, w)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_penalty_matches_numpy(norm):
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(3, 2, 2)).astype("float32")
    w = (w0 + rng.normal(size=(3, 2, 2))).astype("float32")

    value = float(to_numpy(DiffPenalty(reference_variable(w0), 0.25, norm)(w)))

    # float32 reduction of 12 entries.
    assert value == pytest.approx(0.25 * numpy_norm(w - w0, norm), rel=1e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_norm_of_zero_is_zero(norm):
    assert float(to_numpy(difference_norm(np.zeros((3, 4), "float32"), norm))) == 0.0


def penalty_only_model(w0, w, strength, norm):
    """A Dense layer fed with zeros: its kernel's only gradient is the penalty's."""
    layer = keras.layers.Dense(w0.shape[1], use_bias=False)
    model = keras.Sequential([keras.Input((w0.shape[0],)), layer])
    layer.kernel.assign(w)
    layer.kernel.regularizer = DiffPenalty(reference_variable(w0), strength, norm)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model, layer


def fit_one_step(model, inputs):
    zeros = np.zeros((2, inputs), "float32")
    model.fit(zeros, np.ones((2, model.output_shape[-1]), "float32"), batch_size=2, epochs=1, verbose=0)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_penalty_gradient_at_reference_is_finite_and_zero(norm):
    w0 = np.random.default_rng(3).normal(size=(4, 3)).astype("float32")
    model, layer = penalty_only_model(w0, w0, strength=2.0, norm=norm)

    assert [float(to_numpy(loss)) for loss in model.losses] == [0.0]
    fit_one_step(model, 4)

    # A NaN gradient (sqrt at 0) would turn the kernel into NaN.
    assert np.isfinite(to_numpy(layer.kernel)).all()
    np.testing.assert_array_equal(to_numpy(layer.kernel), w0)


def test_penalty_gradient_away_from_reference_l2():
    rng = np.random.default_rng(4)
    w0 = rng.normal(size=(4, 3)).astype("float32")
    d = rng.normal(size=(4, 3)).astype("float32")
    model, layer = penalty_only_model(w0, w0 + d, strength=0.5, norm="l2")

    fit_one_step(model, 4)

    # SGD(1.0) step on λ‖W − W_0‖: W ← W − λ d / ‖d‖.
    expected = (w0 + d) - 0.5 * d / np.linalg.norm(d)
    np.testing.assert_allclose(to_numpy(layer.kernel), expected, atol=1e-6)


def test_penalty_gradient_away_from_reference_linf():
    w0 = np.zeros((2, 2), "float32")
    d = np.array([[0.1, -0.9], [0.3, 0.2]], "float32")
    model, layer = penalty_only_model(w0, d, strength=0.5, norm="linf")

    fit_one_step(model, 2)

    # Only the largest entry gets a gradient: λ · sign(d) there.
    expected = d.copy()
    expected[0, 1] += 0.5
    np.testing.assert_allclose(to_numpy(layer.kernel), expected, atol=1e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize(
    "jit_compile",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                keras.backend.backend() == "torch",
                reason="torch jit_compile=True runs torch.compile, which takes minutes on a CPU",
            ),
        ),
    ],
)
def test_optimizer_applies_constraint_in_fit(norm, jit_compile):
    rng = np.random.default_rng(5)
    layer = keras.layers.Dense(3)
    model = keras.Sequential([keras.Input((4,)), layer])
    w0 = to_numpy(layer.kernel).copy()
    layer.kernel.constraint = DiffConstraint(reference_variable(w0), 0.05, norm)
    model.compile(optimizer=keras.optimizers.SGD(10.0), loss="mse", jit_compile=jit_compile)

    x = rng.normal(size=(8, 4)).astype("float32")
    model.fit(x, 10 * rng.normal(size=(8, 3)).astype("float32"), batch_size=4, epochs=2, verbose=0)

    distance = numpy_norm(to_numpy(layer.kernel).astype(np.float64) - w0, norm)
    assert math.isfinite(distance)
    # Within float32 rounding of the boundary, and on it: the step went further.
    assert 0.99 * 0.05 <= distance <= 0.05 + 1e-6


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="only Keras' JAX trainer empties model variables during fit",
)
def test_tracked_reference_raises_on_jax():
    layer = keras.layers.Dense(3)
    model = keras.Sequential([keras.Input((4,)), layer])
    reference = reference_variable(to_numpy(layer.kernel))
    # A layer that tracks W_0 itself, without keras_peft's train-step wrapper.
    layer._tracker.unlock()
    layer._track_variable(reference)
    layer.kernel.constraint = DiffConstraint(reference, 0.05)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")

    with pytest.raises(RuntimeError, match="has no value here"):
        model.fit(np.ones((4, 4), "float32"), np.ones((4, 3), "float32"), verbose=0)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda r: DiffConstraint(r, 0.0), "`epsilon` must be a finite number greater than 0"),
        (lambda r: DiffConstraint(r, -1), "`epsilon` must be"),
        (lambda r: DiffConstraint(r, float("nan")), "`epsilon` must be"),
        (lambda r: DiffConstraint(r, 0.1, norm="l1"), "Unknown norm 'l1'"),
        (lambda r: DiffPenalty(r, -0.5), "`strength` must be a finite number ≥ 0"),
        (lambda r: DiffPenalty(r, float("inf")), "`strength` must be"),
        (lambda r: DiffPenalty(r, 0.1, norm="max"), "Unknown norm 'max'"),
    ],
)
def test_invalid_arguments(build, fragment):
    with pytest.raises(ValueError, match=fragment):
        build(reference_variable(np.zeros(2)))


def test_config_holds_settings_but_cannot_rebuild():
    constraint = DiffConstraint(reference_variable(np.zeros(2)), 0.1, norm="linf")
    penalty = DiffPenalty(reference_variable(np.zeros(2)), 0.2)

    assert constraint.get_config() == {"epsilon": 0.1, "norm": "linf"}
    assert penalty.get_config() == {"strength": 0.2, "norm": "l2"}
    with pytest.raises(ValueError, match="cannot be rebuilt from a config"):
        DiffConstraint.from_config(constraint.get_config())
    with pytest.raises(ValueError, match="cannot be rebuilt from a config"):
        DiffPenalty.from_config(penalty.get_config())
