import math
import re
import keras
import numpy as np
import pytest
import safetensors.numpy

import keras_peft
import tiny_models
from keras_peft.constraints import DiffConstraint
from keras_peft.constraints import DiffPenalty
from keras_peft.core.paths import LayerIndex
from keras_peft.errors import AdapterFileError
from keras_peft.methods.base import method_from_config
from keras_peft.methods.base import serialize_method
from keras_peft.methods.diff import diff_statistics
from keras_peft.methods.diff import kept_entries
from tiny_models import to_numpy

BACKEND = keras.backend.backend()
EPSILON = 0.05
HEAD_KEYS = {"logits/kernel", "logits/bias"}


def model_state(model):
    """Everything a failed apply must leave unchanged."""
    return {
        "weights": [(v.path, v.trainable, to_numpy(v).tobytes()) for v in model.weights],
        "constraints": [(v.constraint, v.regularizer) for v in model.weights],
        "peft_state": vars(model).get("_keras_peft_state"),
        "applications": len(getattr(vars(model).get("_keras_peft_state"), "applications", [])),
    }


def variables_by_key(model):
    index = LayerIndex(model)
    return {f"{e.path}/{v.name}": v for e in index for v in index.owned_variables(e)}


def diff_variables(model, report):
    by_key = variables_by_key(model)
    return {key: by_key[key] for key in report.trainable_variables if key not in HEAD_KEYS}


def distance(difference, norm):
    difference = np.asarray(difference, np.float64)
    return float(np.max(np.abs(difference))) if norm == "linf" else float(np.linalg.norm(difference))


def hidden_states(model, x):
    """Return the backbone's sequence output (BERT returns a dict, GPT-2 a tensor)."""
    outputs = model.backbone(x)
    return to_numpy(outputs["sequence_output"] if isinstance(outputs, dict) else outputs)


def classifier_pair():
    """Two BERT classifiers with the same weights: one to tune, one to load into."""
    tuned = tiny_models.bert_classifier()
    fresh = tiny_models.bert_classifier()
    fresh.set_weights(tuned.get_weights())
    return tuned, fresh


def fit_with_large_steps(model, jit_compile, epochs):
    """Fit a tiny BERT classifier with SGD(50), which pushes weights past any small ball."""
    model.compile(
        optimizer=keras.optimizers.SGD(50.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    x = tiny_models.token_inputs(4, segment_ids=True)
    model.fit(x, np.array([0, 1, 0, 1]), batch_size=4, epochs=epochs, verbose=0)


def move_inside_ball(variables, norm, seed=0, fraction=0.8):
    """Set every variable to W_0 + d with ‖d‖ = fraction · ε.

    Returns `{key: W − W_0}` as float32 computes it from the new values, which
    is what an adapter file stores (W_0 + d rounds, so this is d to about 1e-9).
    """
    rng = np.random.default_rng(seed)
    differences = {}
    for key, variable in variables.items():
        pretrained = to_numpy(variable).copy()
        difference = rng.normal(size=variable.shape).astype("float32")
        difference *= fraction * EPSILON / distance(difference, norm)
        variable.assign(pretrained + difference)
        differences[key] = to_numpy(variable) - pretrained
    return differences


def bert_keys(layers=(0, 1)):
    keys = {
        "bert_backbone/token_embedding/embeddings",
        "bert_backbone/embeddings_layer_norm/gamma",
        "bert_backbone/embeddings_layer_norm/beta",
    }
    for i in layers:
        block = f"bert_backbone/transformer_layer_{i}"
        for name in ("query", "key", "value", "attention_output"):
            keys |= {f"{block}/self_attention_layer/{name}/kernel", f"{block}/self_attention_layer/{name}/bias"}
        for name in ("feedforward_intermediate_dense", "feedforward_output_dense"):
            keys |= {f"{block}/{name}/kernel", f"{block}/{name}/bias"}
        for name in ("self_attention_layer_norm", "feedforward_layer_norm"):
            keys |= {f"{block}/{name}/gamma", f"{block}/{name}/beta"}
    return keys


def test_default_selection_exact():
    model = tiny_models.bert_classifier()
    report = keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON))

    # Word embeddings, q/k/v/o with biases, feed-forward weights and biases,
    # and layer-norm gamma and beta train. Position and segment embeddings and
    # the pooler stay fixed, and the task head trains freely.
    assert set(report.trainable_variables) == bert_keys() | HEAD_KEYS
    for key, variable in diff_variables(model, report).items():
        assert isinstance(variable.constraint, DiffConstraint), key
        assert variable.regularizer is None, key


def test_components_and_position_embedding_option():
    model = tiny_models.gpt2_causal_lm()
    method = keras_peft.DiffTuning(epsilon=EPSILON, components=["position_embedding", "layer_norm"])
    report = keras_peft.apply(model, method)

    assert "gpt2_backbone/position_embedding/embeddings" in report.trainable_variables
    assert "gpt2_backbone/token_embedding/embeddings" not in report.trainable_variables
    assert all(key.split("/")[-1] in ("embeddings", "gamma", "beta") for key in report.trainable_variables)


def test_identity_at_start_and_penalty_zero():
    model = tiny_models.bert_classifier()
    x = tiny_models.token_inputs(segment_ids=True)
    before = to_numpy(model(x))

    report = keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, penalty=0.1))

    np.testing.assert_array_equal(to_numpy(model(x)), before)
    losses = [float(to_numpy(loss)) for loss in model.losses]
    assert len(losses) == len(diff_variables(model, report))
    assert losses == [0.0] * len(losses)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_penalty_value_matches_formula(norm):
    model = tiny_models.bert_classifier()
    report = keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, penalty=0.3, norm=norm))
    differences = move_inside_ball(diff_variables(model, report), norm)

    total = sum(float(to_numpy(loss)) for loss in model.losses)
    expected = 0.3 * sum(distance(d, norm) for d in differences.values())
    # float32 sums over a few hundred entries: relative error well under 1e-5.
    assert total == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize(
    "jit_compile",
    [
        pytest.param(
            False,
            marks=pytest.mark.skipif(
                BACKEND == "jax",
                reason="JAX without jit compiles each operation on first use (about 15 s for "
                "three steps of a tiny BERT on 2 CPU cores); tests/test_constraints.py covers "
                "the eager constraint on a Dense model",
            ),
        ),
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                BACKEND == "torch",
                reason="torch jit_compile=True runs torch.compile, which takes over two "
                "minutes for a tiny BERT on a CPU",
            ),
        ),
    ],
)
def test_fit_keeps_weights_in_ball(norm, jit_compile):
    model = tiny_models.bert_classifier(num_layers=1)
    report = keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, penalty=1e-3, norm=norm))
    tuned = diff_variables(model, report)
    pretrained = {key: to_numpy(v).copy() for key, v in tuned.items()}

    fit_with_large_steps(model, jit_compile, epochs=3)

    distances = {key: distance(to_numpy(v) - pretrained[key], norm) for key, v in tuned.items()}
    assert all(math.isfinite(d) for d in distances.values())
    # Projection leaves ‖W − W_0‖ = ε up to float32 rounding of W_0 + d.
    assert max(distances.values()) <= EPSILON + 1e-6
    # The large learning rate pushes weights to the boundary: the constraint acted.
    assert max(distances.values()) >= 0.99 * EPSILON
    statistics = diff_statistics(model)
    assert statistics.max_distance_ratio <= 1 + 1e-5


@pytest.mark.parametrize("build", [tiny_models.bert_classifier, tiny_models.gpt2_causal_lm])
def test_dense_diff_round_trip(tmp_path, build):
    tuned = build()
    fresh = build()
    fresh.set_weights(tuned.get_weights())
    report = keras_peft.apply(tuned, keras_peft.DiffTuning(epsilon=EPSILON))
    differences = move_inside_ball(diff_variables(tuned, report), "l2")

    keys = keras_peft.save_adapter(tuned, tmp_path / "diff")
    keras_peft.load_adapter(fresh, tmp_path / "diff")

    stored = safetensors.numpy.load_file(str(tmp_path / "diff" / "adapter_model.safetensors"))
    for key, difference in differences.items():
        np.testing.assert_array_equal(stored[f"{key}_diff"], difference)
    assert set(keys) == {f"{key}_diff" for key in differences} | (set(report.trainable_variables) & HEAD_KEYS)
    x = tiny_models.token_inputs(segment_ids=build is tiny_models.bert_classifier)
    # W_0 + (W − W_0) differs from W by float32 rounding, about 1e-7.
    np.testing.assert_allclose(hidden_states(fresh, x), hidden_states(tuned, x), atol=1e-5)
    np.testing.assert_allclose(to_numpy(fresh(x)), to_numpy(tuned(x)), atol=1e-5)


def test_sparse_diff_keeps_largest_entries_within_bound(tmp_path):
    density = 0.25
    tuned, fresh = classifier_pair()
    report = keras_peft.apply(tuned, keras_peft.DiffTuning(epsilon=EPSILON, save_density=density))
    variables = diff_variables(tuned, report)
    pretrained = {key: to_numpy(v).copy() for key, v in variables.items()}
    differences = move_inside_ball(variables, "l2")

    keras_peft.save_adapter(tuned, tmp_path / "sparse")
    keras_peft.load_adapter(fresh, tmp_path / "sparse")
    stored = safetensors.numpy.load_file(str(tmp_path / "sparse" / "adapter_model.safetensors"))
    loaded = variables_by_key(fresh)

    for key, difference in differences.items():
        size = difference.size
        count = math.ceil(density * size)
        indices, values = stored[f"{key}_diff_indices"], stored[f"{key}_diff_values"]
        assert indices.shape == values.shape == (count,)
        assert indices.dtype == np.int32
        # The kept entries are the largest: none dropped is larger than the smallest kept.
        dropped = np.delete(np.abs(difference.ravel()), indices)
        assert dropped.size == 0 or dropped.max() <= np.abs(values).min()
        np.testing.assert_array_equal(values, difference.ravel()[indices])

        sparse = np.zeros(size, np.float32)
        sparse[indices] = values
        expected = pretrained[key] + sparse.reshape(difference.shape)
        np.testing.assert_allclose(to_numpy(loaded[key]), expected, atol=1e-7)
        # Documented bound on what is lost: ‖r‖_F ≤ sqrt(1 − k / n) · ‖W − W_0‖_F.
        error = np.linalg.norm(to_numpy(loaded[key]).astype(np.float64) - to_numpy(variables[key]))
        bound = math.sqrt(1 - count / size) * np.linalg.norm(difference.astype(np.float64))
        assert error <= bound + 1e-6

    statistics = diff_statistics(tuned)
    total = sum(d.size for d in differences.values())
    assert statistics.density == sum(math.ceil(density * d.size) for d in differences.values()) / total


def test_sparse_file_is_smaller_than_dense(tmp_path):
    sizes = {}
    for density in (1.0, 0.1):
        model = tiny_models.bert_classifier()
        method = keras_peft.DiffTuning(epsilon=EPSILON, save_density=density)
        report = keras_peft.apply(model, method, train_head=False)
        move_inside_ball(diff_variables(model, report), "l2")
        keras_peft.save_adapter(model, tmp_path / str(density))
        stored = safetensors.numpy.load_file(str(tmp_path / str(density) / "adapter_model.safetensors"))
        # Tensor bytes only: on tiny models the file's JSON header outweighs the data.
        sizes[density] = sum(array.nbytes for array in stored.values())
    total = sum(math.prod(v.shape) for v in model.trainable_weights)
    assert sizes[1.0] == 4 * total
    # int32 index + float32 value per kept entry; ⌈0.1 n⌉ entries per tensor.
    assert sizes[0.1] < 8 * (0.1 * total + len(model.trainable_weights))


def test_corrupted_sparse_indices_are_rejected(tmp_path):
    tuned, fresh = classifier_pair()
    report = keras_peft.apply(tuned, keras_peft.DiffTuning(epsilon=EPSILON, save_density=0.5))
    move_inside_ball(diff_variables(tuned, report), "l2")
    keras_peft.save_adapter(tuned, tmp_path / "sparse")
    path = str(tmp_path / "sparse" / "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    key = next(k for k in tensors if k.endswith("_diff_indices"))
    tensors[key] = tensors[key] + np.int32(10_000)
    safetensors.numpy.save_file(tensors, path)
    before = model_state(fresh)

    with pytest.raises(AdapterFileError, match="outside a tensor"):
        keras_peft.load_adapter(fresh, tmp_path / "sparse")

    assert model_state(fresh) == before


def test_repeated_sparse_indices_are_rejected(tmp_path):
    tuned, fresh = classifier_pair()
    report = keras_peft.apply(tuned, keras_peft.DiffTuning(epsilon=EPSILON, save_density=0.5))
    move_inside_ball(diff_variables(tuned, report), "l2")
    keras_peft.save_adapter(tuned, tmp_path / "sparse")
    path = str(tmp_path / "sparse" / "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    key = next(k for k in tensors if k.endswith("_diff_indices") and tensors[k].size > 1)
    tensors[key] = np.zeros_like(tensors[key])
    safetensors.numpy.save_file(tensors, path)
    before = model_state(fresh)

    with pytest.raises(AdapterFileError, match="not strictly ascending"):
        keras_peft.load_adapter(fresh, tmp_path / "sparse")

    assert model_state(fresh) == before


def test_difference_beyond_epsilon_is_rejected(tmp_path):
    tuned, fresh = classifier_pair()
    report = keras_peft.apply(tuned, keras_peft.DiffTuning(epsilon=EPSILON))
    move_inside_ball(diff_variables(tuned, report), "l2")
    keras_peft.save_adapter(tuned, tmp_path / "dense")
    path = str(tmp_path / "dense" / "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    key = next(k for k in tensors if k.endswith("_diff"))
    tensors[key] = tensors[key] * np.float32(1000)
    safetensors.numpy.save_file(tensors, path)
    before = model_state(fresh)

    with pytest.raises(AdapterFileError, match="above the method's epsilon"):
        keras_peft.load_adapter(fresh, tmp_path / "dense")

    assert model_state(fresh) == before


def test_merge_leaves_plain_weights():
    model = tiny_models.bert_classifier()
    paths = [v.path for v in model.weights]
    x = tiny_models.token_inputs(segment_ids=True)
    report = keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, penalty=0.1))
    move_inside_ball(diff_variables(model, report), "l2")
    tuned_states = hidden_states(model, x)
    tuned_logits = to_numpy(model(x))

    keras_peft.merge(model)

    np.testing.assert_array_equal(hidden_states(model, x), tuned_states)
    np.testing.assert_array_equal(to_numpy(model(x)), tuned_logits)
    assert all(v.constraint is None and v.regularizer is None for v in model.weights)
    assert [v.path for v in model.weights] == paths
    assert model.losses == []
    assert "_keras_peft_state" not in vars(model)
    assert "train_step" not in vars(model)
    assert model.get_config()["num_classes"] == 2


def test_remove_restores_pretrained_weights():
    model = tiny_models.bert_classifier()
    paths = [v.path for v in model.weights]
    before = {key: to_numpy(v).copy() for key, v in variables_by_key(model).items()}
    report = keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, penalty=0.1))
    tuned = diff_variables(model, report)
    move_inside_ball(tuned, "l2")

    keras_peft.remove(model)

    for key in tuned:
        np.testing.assert_array_equal(to_numpy(tuned[key]), before[key])
        assert tuned[key].constraint is None
        assert tuned[key].regularizer is None
    assert [v.path for v in model.weights] == paths
    assert model.losses == []
    assert "train_step" not in vars(model)


def references_of(model):
    """Return `{"<path>/<name>": W_0}` for every diff-tuned variable."""
    state = vars(model)["_keras_peft_state"]
    return {
        f"{edit.path}/{name}": reference
        for edit in state.edits()
        for name, reference in edit.references.items()
    }


def test_pretrained_copy_is_kept_once_and_never_trained():
    model = tiny_models.bert_classifier(num_layers=1)
    total = model.count_params()
    report = keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, penalty=0.1))
    references = references_of(model)
    tuned = diff_variables(model, report)
    assert sorted(references) == sorted(tuned)

    # Each W_0 is tracked once, by the model, and is not trainable.
    non_trainable_ids = [id(v) for v in model.non_trainable_variables]
    for key, reference in references.items():
        assert non_trainable_ids.count(id(reference)) == 1
        assert not reference.trainable
        assert reference.shape == tuned[key].shape
        assert reference.path == tuned[key].path + "_pretrained"
    # The report counts the model's parameters, not the copies of W_0.
    assert report.total_parameters == total

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = tiny_models.token_inputs(4, segment_ids=True)
    model.fit(x, np.array([0, 1, 0, 1]), batch_size=4, epochs=1, verbose=0)
    optimizer_ids = {id(v) for v in model.optimizer.variables}
    trainable_ids = {id(v) for v in model.trainable_variables}
    for reference in references.values():
        assert id(reference) not in optimizer_ids
        assert id(reference) not in trainable_ids
    # Adam keeps two slots per trained variable (plus its step counter and
    # learning rate); none belong to a W_0.
    assert len(model.optimizer.variables) == 2 * len(model.trainable_variables) + 2


@pytest.mark.skipif(BACKEND != "jax", reason="inspects the program that jax.jit compiles")
def test_jitted_jax_step_has_no_pretrained_constant():
    import jax

    model = tiny_models.bert_classifier(num_layers=1)
    keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, penalty=0.1))
    smallest = min(int(np.prod(r.shape)) * 4 for r in references_of(model).values())
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    x = tiny_models.token_inputs(4, segment_ids=True)
    y = np.array([0, 1, 0, 1])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)

    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    program = jax.jit(model.train_step).lower(state, (x, y)).as_text()
    # A W_0 captured by the program would appear as a hex-encoded constant.
    constants = re.findall(r'stablehlo\.constant dense<"0x([0-9A-F]+)">', program)
    assert max((len(c) // 2 for c in constants), default=0) < smallest


def test_config_round_trip():
    method = keras_peft.DiffTuning(
        epsilon=0.2, penalty=1e-3, norm="linf", components=["query", "value"], exclude=["pooled_dense"], save_density=0.3
    )
    assert method_from_config(serialize_method(method)) == method
    assert kept_entries(10, 0.3) == 3


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"epsilon": 0}, "`epsilon` must be a finite number greater than 0"),
        ({"epsilon": -0.1}, "`epsilon` must be"),
        ({"epsilon": float("inf")}, "`epsilon` must be"),
        ({"epsilon": float("nan")}, "`epsilon` must be"),
        ({"epsilon": True}, "`epsilon` must be"),
        ({"epsilon": "0.1"}, "`epsilon` must be"),
        ({"epsilon": 0.1, "penalty": -1.0}, "`penalty` must be a finite number ≥ 0"),
        ({"epsilon": 0.1, "penalty": float("nan")}, "`penalty` must be"),
        ({"epsilon": 0.1, "norm": "l1"}, "Unknown norm 'l1'"),
        ({"epsilon": 0.1, "norm": "L2"}, "Unknown norm"),
        ({"epsilon": 0.1, "save_density": 0}, r"`save_density` must be a number in \(0, 1\]"),
        ({"epsilon": 0.1, "save_density": 1.5}, "`save_density` must be"),
        ({"epsilon": 0.1, "save_density": -0.2}, "`save_density` must be"),
        ({"epsilon": 0.1, "save_density": float("nan")}, "`save_density` must be"),
        ({"epsilon": 0.1, "components": ["attention"]}, "Valid components"),
        ({"epsilon": 0.1, "components": []}, "needs something to train"),
    ],
)
def test_invalid_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        keras_peft.DiffTuning(**kwargs)


def test_existing_regularizer_raises_and_model_unchanged():
    model = tiny_models.bert_classifier()
    model.backbone.transformer_layers[0]._feedforward_output_dense.kernel.regularizer = keras.regularizers.L2(0.1)
    before = model_state(model)

    with pytest.raises(ValueError, match="already has a constraint"):
        keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON))

    assert model_state(model) == before


def test_applying_twice_raises_and_model_unchanged():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON))
    before = model_state(model)

    with pytest.raises(ValueError, match="already diff-tuned"):
        keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, components=["layer_norm"]))

    assert model_state(model) == before


def test_missing_component_raises_and_model_unchanged():
    model = tiny_models.bert_classifier()
    before = model_state(model)

    with pytest.raises(ValueError, match=r"no layer in the component\(s\) \['cross_attention_output'\]"):
        keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, components=["query", "cross_attention_output"]))

    assert model_state(model) == before


def test_statistics_without_diff_tuning():
    model = tiny_models.bert_classifier()
    keras_peft.apply(model, keras_peft.BiasOnly())
    with pytest.raises(ValueError, match="has no DiffTuning applied"):
        diff_statistics(model)


def test_penalty_class_is_used_when_strength_positive():
    model = tiny_models.bert_classifier()
    report = keras_peft.apply(model, keras_peft.DiffTuning(epsilon=EPSILON, penalty=0.5, norm="linf"))
    variable = next(iter(diff_variables(model, report).values()))
    assert isinstance(variable.regularizer, DiffPenalty)
    assert variable.regularizer.norm == "linf"
    assert variable.constraint.norm == "linf"


def test_save_weights_round_trip_keeps_pretrained_copy(tmp_path):
    tuned, fresh = classifier_pair()
    x = tiny_models.token_inputs(segment_ids=True)
    report = keras_peft.apply(tuned, keras_peft.DiffTuning(epsilon=EPSILON))
    move_inside_ball(diff_variables(tuned, report), "l2")
    path = str(tmp_path / "tuned.weights.h5")
    tuned.save_weights(path)

    keras_peft.apply(fresh, keras_peft.DiffTuning(epsilon=EPSILON))
    for reference in references_of(fresh).values():
        reference.assign(np.zeros(reference.shape, reference.dtype))
    fresh.load_weights(path)

    np.testing.assert_array_equal(to_numpy(fresh(x)), to_numpy(tuned(x)))
    loaded = references_of(fresh)
    for key, reference in references_of(tuned).items():
        np.testing.assert_array_equal(to_numpy(loaded[key]), to_numpy(reference))


@pytest.mark.parametrize("jit_compile", [False, True] if BACKEND != "torch" else [False])
def test_backbone_inside_task_stays_in_ball(jit_compile):
    classifier = tiny_models.bert_classifier(num_layers=1)
    report = keras_peft.apply(classifier.backbone, keras_peft.DiffTuning(epsilon=EPSILON))
    by_key = variables_by_key(classifier.backbone)
    tuned = {key: by_key[key] for key in report.trainable_variables}
    pretrained = {key: to_numpy(v).copy() for key, v in tuned.items()}

    fit_with_large_steps(classifier, jit_compile, epochs=2)

    distances = [distance(to_numpy(v) - pretrained[key], "l2") for key, v in tuned.items()]
    assert max(distances) <= EPSILON + 1e-6
    assert max(distances) >= 0.99 * EPSILON
