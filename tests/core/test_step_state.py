import keras
import numpy as np
import pytest

from keras_peft.core import step_state

BACKEND = keras.backend.backend()
ONLY_JAX = pytest.mark.skipif(BACKEND != "jax", reason="the wrappers exist on JAX only")


def small_model():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(inputs)
    return keras.Model(inputs, outputs)


def tracked_marker(model):
    """Return a non-trainable variable that `model` tracks, as DiffTuning's W_0."""
    marker = keras.Variable(np.full((2,), 7.0, "float32"), trainable=False, name="marker")
    model._tracker.unlock()
    model._track_variable(marker)
    model._tracker.lock()
    return marker


@pytest.mark.skipif(BACKEND == "jax", reason="checks the backends that read variables in place")
def test_nothing_is_wrapped_outside_jax():
    model = small_model()
    marker = tracked_marker(model)
    step_state.watch(model, [marker])
    assert "train_step" not in vars(model)
    assert "call" not in vars(model)
    step_state.unwatch(model, [marker])


@ONLY_JAX
def test_wrappers_stay_until_the_last_variable_is_unwatched():
    model = small_model()
    first, second = tracked_marker(model), tracked_marker(model)
    step_state.watch(model, [first])
    step_state.watch(model, [second])
    wrapper = vars(model)["train_step"]

    step_state.unwatch(model, [first])
    assert vars(model)["train_step"] is wrapper
    step_state.unwatch(model, [second])
    assert "train_step" not in vars(model)
    assert "call" not in vars(model)
    # One more call has nothing to undo.
    step_state.unwatch(model, [second])
    assert not step_state.is_watched(model)


@ONLY_JAX
def test_fit_step_reads_emptied_values():
    model = small_model()
    marker = tracked_marker(model)
    seen = []

    def own_train_step(state, data):
        seen.append(step_state.current_value(marker))
        return type(model).train_step(model, state, data)

    object.__setattr__(model, "train_step", own_train_step)
    step_state.watch(model, [marker])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), verbose=0)

    # The step saw a value for the variable although Keras emptied it during fit.
    assert seen and all(value is not None for value in seen)
    assert step_state.current_value(marker) is None
    step_state.unwatch(model, [marker])
    assert vars(model)["train_step"] is own_train_step


@ONLY_JAX
def test_forward_pass_records_values_for_a_containing_model():
    inner = small_model()
    marker = tracked_marker(inner)
    step_state.watch(inner, [marker])
    inputs = keras.Input((3,))
    outer = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))
    seen = []

    def outer_train_step(state, data):
        result = type(outer).train_step(outer, state, data)
        # After the forward pass, with the variable emptied by the outer fit.
        seen.append(step_state.current_value(marker))
        return result

    object.__setattr__(outer, "train_step", outer_train_step)
    outer.compile(optimizer="sgd", loss="mse")
    outer.fit(np.ones((4, 3), "float32"), np.ones((4, 1), "float32"), verbose=0)

    assert seen and all(value is not None for value in seen)
    step_state.unwatch(inner, [marker])
