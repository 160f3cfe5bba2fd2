import numpy as np
import pytest

import keras

from keras_peft.layers import LoRADense
from tiny_models import to_numpy

# float32 matrix products on random data of this size agree to about 1e-6;
# 1e-5 leaves room for the different summation orders of the backends.
ATOL = 1e-5


def dense_base():
    layer = keras.layers.Dense(6, activation="relu", name="proj")
    layer.build((None, 5))
    return layer


def einsum_base():
    # The KerasHub query projection: (batch, seq, hidden) x (hidden, heads, head_dim).
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 3, 4), bias_axes="de", name="query")
    layer.build((None, None, 5))
    return layer


def einsum_output_base():
    # The KerasHub attention output: (batch, seq, heads, head_dim) x (heads, head_dim, hidden).
    layer = keras.layers.EinsumDense("abcd,cde->abe", output_shape=(None, 5), bias_axes="e", name="out")
    layer.build((None, None, 3, 4))
    return layer


def randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
        variable.assign(rng.normal(size=variable.shape).astype("float32"))


def reference_dense(x, kernel, bias, a, b, scaling):
    return np.maximum(x @ kernel + bias + scaling * (x @ a) @ b, 0.0)


CASES = [
    ("dense", dense_base, (4, 5)),
    ("einsum_query", einsum_base, (2, 7, 5)),
    ("einsum_output", einsum_output_base, (2, 7, 3, 4)),
]


@pytest.mark.parametrize("name,make_base,input_shape", CASES)
def test_identity_at_start(name, make_base, input_shape):
    base = make_base()
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    expected = to_numpy(base(x))
    layer = LoRADense(base, rank=2, alpha=4)
    np.testing.assert_array_equal(to_numpy(layer(x)), expected)


def test_dense_matches_numpy_reference():
    base = dense_base()
    layer = LoRADense(base, rank=3, alpha=6)
    randomize(layer)
    x = np.random.default_rng(2).normal(size=(4, 5)).astype("float32")
    expected = reference_dense(
        x,
        to_numpy(base.kernel),
        to_numpy(base.bias),
        to_numpy(layer.lora_kernel_a),
        to_numpy(layer.lora_kernel_b),
        scaling=6 / 3,
    )
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=ATOL)


def test_dense_on_sequences_in_compiled_predict():
    # predict compiles the call. The second input shape makes TensorFlow retrace
    # with unknown batch and sequence sizes, so the reshapes see dynamic shapes.
    base = dense_base()
    layer = LoRADense(base, rank=3, alpha=6)
    randomize(layer)
    inputs = keras.Input((None, 5))
    model = keras.Model(inputs, layer(inputs))
    arrays = [to_numpy(v) for v in (base.kernel, base.bias, layer.lora_kernel_a, layer.lora_kernel_b)]
    for seed, shape in ((4, (3, 7, 5)), (5, (2, 4, 5))):
        x = np.random.default_rng(seed).normal(size=shape).astype("float32")
        expected = reference_dense(x, *arrays, scaling=6 / 3)
        np.testing.assert_allclose(model.predict(x, batch_size=shape[0], verbose=0), expected, atol=ATOL)


def test_einsum_matches_numpy_reference():
    base = einsum_base()
    layer = LoRADense(base, rank=2, alpha=2)
    randomize(layer)
    x = np.random.default_rng(3).normal(size=(2, 7, 5)).astype("float32")
    kernel = to_numpy(base.kernel)  # (5, 3, 4)
    a = to_numpy(layer.lora_kernel_a)  # (5, 2)
    b = to_numpy(layer.lora_kernel_b)  # (2, 12)
    delta = (a @ b).reshape(5, 3, 4)
    expected = np.einsum("abc,cde->abde", x, kernel + delta) + to_numpy(base.bias)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=ATOL)


def test_standard_lora_parameter_counts():
    # A is d x r and B is r x (heads * head_dim), r * (d + heads * head_dim) in all.
    layer = LoRADense(einsum_base(), rank=2)
    assert tuple(layer.lora_kernel_a.shape) == (5, 2)
    assert tuple(layer.lora_kernel_b.shape) == (2, 12)
    assert sum(int(np.prod(w.shape)) for w in layer.trainable_weights) == 2 * (5 + 12)

    output_layer = LoRADense(einsum_output_base(), rank=2)
    assert tuple(output_layer.lora_kernel_a.shape) == (12, 2)
    assert tuple(output_layer.lora_kernel_b.shape) == (2, 5)


def test_only_factors_train_and_base_is_bit_identical():
    inputs = keras.Input((5,))
    base = keras.layers.Dense(3, name="proj")
    layer = LoRADense(base, rank=2)
    model = keras.Model(inputs, layer(inputs))
    kernel_before = to_numpy(base.kernel).copy()
    bias_before = to_numpy(base.bias).copy()
    a_before = to_numpy(layer.lora_kernel_a).copy()
    assert sorted(w.name for w in model.trainable_weights) == ["lora_kernel_a", "lora_kernel_b"]

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 5)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    # With B = 0 the first step's gradient reaches B only: A gets B^T-weighted zeros.
    np.testing.assert_array_equal(to_numpy(layer.lora_kernel_a), a_before)
    assert np.abs(to_numpy(layer.lora_kernel_b)).max() > 0

    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert not np.array_equal(to_numpy(layer.lora_kernel_a), a_before)
    np.testing.assert_array_equal(to_numpy(base.kernel), kernel_before)
    np.testing.assert_array_equal(to_numpy(base.bias), bias_before)


@pytest.mark.parametrize("name,make_base,input_shape", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(name, make_base, input_shape):
    base = make_base()
    layer = LoRADense(base, rank=2, alpha=3)
    randomize(layer, seed=5)
    x = np.random.default_rng(6).normal(size=input_shape).astype("float32")
    kernel_before = to_numpy(base.kernel).copy()
    unmerged = to_numpy(layer(x))

    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(to_numpy(layer(x)), unmerged, atol=ATOL)
    assert not np.allclose(to_numpy(base.kernel), kernel_before)

    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(to_numpy(base.kernel), kernel_before, atol=ATOL)
    np.testing.assert_allclose(to_numpy(layer(x)), unmerged, atol=ATOL)


def test_merge_rejects_non_finite_update():
    base = dense_base()
    layer = LoRADense(base, rank=2)
    layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, np.nan, "float32"))
    kernel_before = to_numpy(base.kernel).copy()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(to_numpy(base.kernel), kernel_before)


def test_config_round_trip():
    layer = LoRADense(dense_base(), rank=3, alpha=5, dropout=0.25)
    config = layer.get_config()
    restored = LoRADense.from_config(config)
    assert restored.rank == 3
    assert restored.alpha == 5.0
    assert restored.dropout == 0.25
    assert restored.activation is keras.activations.relu
    assert restored.base_layer.units == 6
    assert restored.get_config() == config


def test_model_save_round_trip(tmp_path):
    inputs = keras.Input((5,))
    layer = LoRADense(keras.layers.Dense(3, activation="tanh"), rank=2, alpha=4)
    model = keras.Model(inputs, layer(inputs))
    randomize(layer, seed=7)
    x = np.random.default_rng(8).normal(size=(4, 5)).astype("float32")
    expected = to_numpy(model(x))

    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(restored(x)), expected, atol=ATOL)
    assert isinstance(restored.layers[-1], LoRADense)


def test_dropout_only_in_training():
    layer = LoRADense(dense_base(), rank=2, dropout=0.5)
    randomize(layer, seed=9)
    x = np.ones((64, 5), "float32")
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), to_numpy(layer(x, training=False)))
    assert not np.allclose(to_numpy(layer(x, training=True)), to_numpy(layer(x, training=False)))


def test_mixed_bfloat16_keeps_float32_factors():
    keras.config.set_dtype_policy("mixed_bfloat16")
    base = keras.layers.Dense(4)
    base.build((None, 8))
    layer = LoRADense(base, rank=2)
    assert layer.lora_kernel_a.dtype == "float32"
    assert layer.lora_kernel_b.dtype == "float32"
    randomize(layer, seed=10)
    x = np.random.default_rng(11).normal(size=(3, 8)).astype("float32")
    outputs = layer(x)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    expected = x @ to_numpy(base.kernel) + to_numpy(base.bias)
    expected += (x @ to_numpy(layer.lora_kernel_a)) @ to_numpy(layer.lora_kernel_b)
    # bfloat16 keeps 8 significant bits: relative error up to about 2^-8 per operation.
    np.testing.assert_allclose(to_numpy(outputs).astype("float32"), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "8", None])
def test_invalid_rank(rank):
    with pytest.raises(ValueError, match="`rank` must be a positive integer"):
        LoRADense(dense_base(), rank=rank)


@pytest.mark.parametrize("alpha", [0, -2.0, float("nan"), float("inf"), "16", True])
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="`alpha` must be a finite number greater than 0"):
        LoRADense(dense_base(), rank=2, alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.1", None])
def test_invalid_dropout(dropout):
    with pytest.raises(ValueError, match=r"`dropout` must be a number in \[0, 1\)"):
        LoRADense(dense_base(), rank=2, dropout=dropout)


def test_rejects_other_layer_types():
    with pytest.raises(TypeError, match="wraps a keras.layers.Dense or keras.layers.EinsumDense"):
        LoRADense(keras.layers.Conv1D(2, 3), rank=2)


def test_rejects_wrapping_twice():
    layer = LoRADense(dense_base(), rank=2)
    with pytest.raises(TypeError, match="wraps a keras.layers.Dense"):
        LoRADense(layer, rank=2)


def test_failed_construction_leaves_base_unchanged():
    base = dense_base()
    with pytest.raises(ValueError):
        LoRADense(base, rank=0)
    assert base.activation is keras.activations.relu
    assert base.trainable


def test_merge_after_compiled_predict():
    # The merged state is a variable, so a predict function traced before
    # merge() must not add the update a second time.
    inputs = keras.Input((5,))
    layer = LoRADense(keras.layers.Dense(3), rank=2)
    model = keras.Model(inputs, layer(inputs))
    randomize(layer, seed=12)
    x = np.random.default_rng(13).normal(size=(4, 5)).astype("float32")
    before = model.predict(x, verbose=0)
    layer.merge()
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=ATOL)
    layer.unmerge()
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=ATOL)


def test_rank_larger_than_layer():
    base = dense_base()  # 5 inputs, 6 outputs
    with pytest.raises(ValueError, match=r"`rank` must be at most min\(inputs, outputs\) = 5"):
        LoRADense(base, rank=6)


def test_einsum_with_reordered_output_axes():
    # The output lists the kernel's produced axes in another order (e before d),
    # so the layer cannot use plain matrix products and falls back to einsum.
    base = keras.layers.EinsumDense("abc,cde->abed", output_shape=(None, 4, 3), bias_axes="ed")
    base.build((None, None, 5))
    layer = LoRADense(base, rank=2, alpha=4)
    assert not layer._plan["flat"]
    randomize(layer, seed=14)
    x = np.random.default_rng(15).normal(size=(2, 7, 5)).astype("float32")
    kernel = to_numpy(base.kernel)  # (5, 3, 4)
    delta = (to_numpy(layer.lora_kernel_a) @ to_numpy(layer.lora_kernel_b)).reshape(5, 3, 4) * 2.0
    expected = np.einsum("abc,cde->abed", x, kernel + delta) + to_numpy(base.bias)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=ATOL)
    layer.merge()
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=ATOL)


def test_flat_plan_for_kerashub_projections():
    assert LoRADense(einsum_base(), rank=2)._plan["flat"]
    assert LoRADense(einsum_output_base(), rank=2)._plan["flat"]


def test_unbuilt_base_without_input_shape_raises():
    wrapper = LoRADense(keras.layers.Dense(4), rank=2)
    with pytest.raises(ValueError, match="needs an input shape"):
        wrapper.build(None)
    assert not wrapper.built
