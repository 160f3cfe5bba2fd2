import keras
import numpy as np
import pytest

from keras_peft.layers import AdapterBlock
from keras_peft.layers.adapter_block import AdapterWrapper
from keras_peft.layers.adapter_block import activation_names

HIDDEN = 8
BOTTLENECK = 3


def _numpy_adapter(x, down_kernel, down_bias, up_kernel, up_bias, activation):
    return x + activation(x @ down_kernel + down_bias) @ up_kernel + up_bias


def _relu(x):
    return np.maximum(x, 0.0)


def _gelu(x):
    # Keras' default gelu is the exact form, 0.5·x·(1 + erf(x / √2)).
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def _randomize(layer, seed=0):
    """Give every adapter weight non-zero random values; return them as NumPy arrays."""
    rng = np.random.default_rng(seed)
    values = {}
    for variable in (layer.down_kernel, layer.down_bias, layer.up_kernel, layer.up_bias):
        value = rng.normal(size=variable.shape).astype("float32")
        variable.assign(value)
        values[variable.name] = value
    return values


def _inputs(shape=(2, 5, HIDDEN), seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_block_is_identity_at_start():
    layer = AdapterBlock(bottleneck=BOTTLENECK)
    x = _inputs()
    outputs = keras.ops.convert_to_numpy(layer(x))
    # W_up and b_up are exactly zero, so x + 0 is x bit for bit.
    np.testing.assert_array_equal(outputs, x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.up_kernel), 0.0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.up_bias), 0.0)


def test_block_weight_shapes_and_names():
    layer = AdapterBlock(bottleneck=BOTTLENECK)
    layer.build((None, HIDDEN))
    shapes = {v.name: tuple(v.shape) for v in layer.weights}
    assert shapes == {
        "down_kernel": (HIDDEN, BOTTLENECK),
        "down_bias": (BOTTLENECK,),
        "up_kernel": (BOTTLENECK, HIDDEN),
        "up_bias": (HIDDEN,),
    }
    assert len(layer.trainable_weights) == 4
    assert layer.count_params() == 2 * HIDDEN * BOTTLENECK + BOTTLENECK + HIDDEN


@pytest.mark.parametrize("activation, reference", [("relu", _relu), ("gelu", _gelu), ("tanh", np.tanh)])
def test_block_matches_numpy_reference(activation, reference):
    layer = AdapterBlock(bottleneck=BOTTLENECK, activation=activation)
    layer.build((None, HIDDEN))
    weights = _randomize(layer)
    x = _inputs()
    expected = _numpy_adapter(
        x, weights["down_kernel"], weights["down_bias"], weights["up_kernel"], weights["up_bias"], reference
    )
    outputs = keras.ops.convert_to_numpy(layer(x))
    # float32 matmuls of width 8 and 3; the backends sum in different orders.
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_block_default_activation_is_relu():
    layer = AdapterBlock(bottleneck=BOTTLENECK)
    assert layer.get_config()["activation"] == "relu"


def test_block_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown adapter activation 'relu7'") as info:
        AdapterBlock(bottleneck=BOTTLENECK, activation="relu7")
    for name in ("relu", "gelu", "silu", "tanh"):
        assert name in str(info.value)


def test_block_rejects_shape_changing_activation():
    assert "glu" not in activation_names()
    with pytest.raises(ValueError, match="Unknown adapter activation 'glu'"):
        AdapterBlock(bottleneck=BOTTLENECK, activation="glu")


@pytest.mark.parametrize("bottleneck", [0, -2, 2.5, True, None])
def test_block_rejects_invalid_bottleneck(bottleneck):
    with pytest.raises(ValueError, match="`bottleneck` must be a positive integer"):
        AdapterBlock(bottleneck=bottleneck)


def test_block_rejects_bottleneck_larger_than_hidden():
    layer = AdapterBlock(bottleneck=HIDDEN + 1)
    with pytest.raises(ValueError, match="must not be larger than the hidden size d=8"):
        layer.build((None, HIDDEN))
    assert not layer.built
    assert layer.weights == []


def test_block_config_round_trip():
    layer = AdapterBlock(bottleneck=BOTTLENECK, activation="silu", name="adapter")
    layer.build((None, HIDDEN))
    _randomize(layer)
    config = layer.get_config()
    restored = AdapterBlock.from_config(config)
    assert restored.get_config() == config
    restored.build((None, HIDDEN))
    restored.set_weights(layer.get_weights())
    x = _inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored(x)), keras.ops.convert_to_numpy(layer(x))
    )


def test_block_in_model_saves_and_loads(tmp_path):
    inputs = keras.Input((5, HIDDEN))
    outputs = AdapterBlock(bottleneck=BOTTLENECK, activation="gelu")(keras.layers.Dense(HIDDEN)(inputs))
    model = keras.Model(inputs, outputs)
    _randomize(model.layers[-1])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = _inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x))
    )


def _three_fit_steps(model):
    x = _inputs((12, HIDDEN), seed=2)
    y = _inputs((12, HIDDEN), seed=3)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # 12 / 4 = 3 steps


def test_block_fit_changes_only_adapter_weights():
    frozen = keras.layers.Dense(HIDDEN, trainable=False)
    adapter = AdapterBlock(bottleneck=BOTTLENECK)
    model = keras.Sequential([keras.Input((HIDDEN,)), frozen, adapter])
    frozen_before = [keras.ops.convert_to_numpy(v).copy() for v in frozen.weights]
    adapter_before = {v.name: keras.ops.convert_to_numpy(v).copy() for v in adapter.weights}

    _three_fit_steps(model)

    for before, variable in zip(frozen_before, frozen.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), before)
    for variable in adapter.weights:
        # The first step moves only W_up and b_up (W_up = 0 blocks the
        # gradient of W_down); later steps move all four.
        assert not np.array_equal(keras.ops.convert_to_numpy(variable), adapter_before[variable.name]), variable.name


def test_block_float32_weights_under_mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = AdapterBlock(bottleneck=BOTTLENECK)
    x = _inputs()
    outputs = layer(x)
    assert layer.compute_dtype == "bfloat16"
    assert [v.dtype for v in layer.weights] == ["float32"] * 4
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    # The inputs are cast to bfloat16; the adapter adds exactly zero to them.
    expected = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(x, "bfloat16"), "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32")), expected)


def test_block_mixed_bfloat16_matches_reference():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = AdapterBlock(bottleneck=BOTTLENECK)
    layer.build((None, HIDDEN))
    weights = _randomize(layer)
    x = _inputs()
    outputs = keras.ops.convert_to_numpy(keras.ops.cast(layer(x), "float32"))
    expected = _numpy_adapter(
        x, weights["down_kernel"], weights["down_bias"], weights["up_kernel"], weights["up_bias"], _relu
    )
    # bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.0039); the
    # values here are of order 10, so allow a few steps of that size.
    np.testing.assert_allclose(outputs, expected, rtol=0.05, atol=0.2)


# AdapterWrapper: a base layer followed by an adapter.


def test_wrapper_is_identity_of_base_at_start():
    base = keras.layers.Dense(HIDDEN)
    x = _inputs((4, 6))
    base_outputs = keras.ops.convert_to_numpy(base(x))
    wrapper = AdapterWrapper(base, bottleneck=BOTTLENECK)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(wrapper(x)), base_outputs)
    assert wrapper.name == base.name
    assert wrapper._keras_peft_wrapper is True
    assert wrapper.base_layer is base
    assert base.trainable is False


def test_wrapper_matches_numpy_reference():
    base = keras.layers.EinsumDense("abcd,cde->abe", output_shape=(None, HIDDEN), bias_axes="e")
    x = _inputs((2, 5, 2, 4))
    base(x)
    wrapper = AdapterWrapper(base, bottleneck=BOTTLENECK, activation="tanh")
    weights = _randomize(wrapper)
    base_outputs = keras.ops.convert_to_numpy(base(x))
    expected = _numpy_adapter(
        base_outputs, weights["down_kernel"], weights["down_bias"], weights["up_kernel"], weights["up_bias"], np.tanh
    )
    # float32 matmuls of width 8 and 3 in a different summation order.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(wrapper(x)), expected, rtol=1e-5, atol=1e-5)


def test_wrapper_builds_lazily_in_functional_model():
    inputs = keras.Input((6,))
    wrapper = AdapterWrapper(keras.layers.Dense(HIDDEN), bottleneck=BOTTLENECK)
    model = keras.Model(inputs, wrapper(inputs))
    assert model.output.shape == (None, HIDDEN)
    assert [w.name for w in model.trainable_weights] == ["down_kernel", "down_bias", "up_kernel", "up_bias"]
    assert [w.name for w in model.non_trainable_weights] == ["kernel", "bias"]


def test_wrapper_fit_keeps_base_bit_identical():
    base = keras.layers.Dense(HIDDEN)
    model = keras.Sequential([keras.Input((HIDDEN,)), AdapterWrapper(base, bottleneck=BOTTLENECK)])
    wrapper = model.layers[-1]
    base_before = [keras.ops.convert_to_numpy(v).copy() for v in base.weights]
    adapter_before = {v.name: keras.ops.convert_to_numpy(v).copy() for v in wrapper.trainable_weights}

    _three_fit_steps(model)

    for before, variable in zip(base_before, base.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), before)
    for variable in wrapper.trainable_weights:
        assert not np.array_equal(keras.ops.convert_to_numpy(variable), adapter_before[variable.name]), variable.name


def test_wrapper_release_returns_base_layer():
    base = keras.layers.Dense(HIDDEN)
    base.build((None, 6))
    wrapper = AdapterWrapper(base, bottleneck=BOTTLENECK)
    assert wrapper.release_base_layer() is base


def test_wrapper_rejects_double_wrapping():
    base = keras.layers.Dense(HIDDEN)
    base.build((None, 6))
    wrapper = AdapterWrapper(base, bottleneck=BOTTLENECK)
    with pytest.raises(ValueError, match="already has an adapter"):
        AdapterWrapper(wrapper, bottleneck=BOTTLENECK)


def test_wrapper_rejects_bottleneck_larger_than_output():
    base = keras.layers.Dense(HIDDEN)
    base.build((None, 6))
    with pytest.raises(ValueError, match="must not be larger than the hidden size d=8"):
        AdapterWrapper(base, bottleneck=HIDDEN + 1)


def test_wrapper_config_round_trip_in_saved_model(tmp_path):
    inputs = keras.Input((6,))
    wrapper = AdapterWrapper(keras.layers.Dense(HIDDEN, activation="relu"), bottleneck=BOTTLENECK)
    model = keras.Model(inputs, wrapper(inputs))
    _randomize(wrapper)
    config = wrapper.get_config()
    assert config["base_layer"]["class_name"] == "Dense"
    assert AdapterWrapper.from_config(config).get_config() == config

    path = str(tmp_path / "wrapped.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = _inputs((3, 6))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x))
    )
    assert loaded.layers[-1].base_layer.trainable is False


def test_wrapper_float32_weights_under_mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    base = keras.layers.Dense(HIDDEN)
    base.build((None, 6))
    wrapper = AdapterWrapper(base, bottleneck=BOTTLENECK)
    outputs = wrapper(_inputs((3, 6)))
    assert wrapper.dtype_policy.name == "mixed_bfloat16"
    assert [v.dtype for v in wrapper.trainable_weights] == ["float32"] * 4
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"


def test_unbuilt_base_without_input_shape_raises():
    wrapper = AdapterWrapper(keras.layers.Dense(4), bottleneck=2)
    with pytest.raises(ValueError, match="needs an input shape"):
        wrapper.build(None)
    assert not wrapper.built
