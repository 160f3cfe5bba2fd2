import keras
import numpy as np
import pytest

import keras_peft
from keras_peft.core import training_build
from tests import tiny_models

BACKEND = keras.backend.backend()
# Keras' torch trainer runs train_step eagerly, once per step, so a count of
# its calls is not a count of traces there.
TRACED = pytest.mark.skipif(BACKEND == "torch", reason="torch runs the step eagerly")
ONLY_TENSORFLOW = pytest.mark.skipif(BACKEND != "tensorflow", reason="the hook exists on TensorFlow only")


def adapted_classifier():
    classifier = tiny_models.bert_classifier()
    keras_peft.apply(classifier, keras_peft.LoRA(rank=2, targets=["query", "value"]))
    return classifier


def compile_with_metrics(model, jit_compile="auto"):
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
        jit_compile=jit_compile,
    )


def record_train_steps(model):
    """Wrap `model.train_step` to record, per Python call, whether the optimizer was built."""
    calls = []
    train_step = model.train_step

    def recorded(*args, **kwargs):
        calls.append({"optimizer_built": model.optimizer.built, "variables": len(model.optimizer.variables)})
        return train_step(*args, **kwargs)

    model.train_step = recorded
    return calls


def training_data(batches=3, batch_size=2, seed=0):
    x = tiny_models.token_inputs(batch=batches * batch_size, seed=seed, segment_ids=True)
    y = np.random.default_rng(seed).integers(0, 2, size=(batches * batch_size,))
    return x, y


def recorded_classifier(jit_compile="auto"):
    """Return an adapted, compiled classifier and the list its train_step calls append to."""
    classifier = adapted_classifier()
    calls = record_train_steps(classifier)
    compile_with_metrics(classifier, jit_compile=jit_compile)
    return classifier, calls


@TRACED
def test_fit_traces_step_once_with_metrics():
    classifier, calls = recorded_classifier(jit_compile=True)
    x, y = training_data(batches=3)

    classifier.fit(x, y, batch_size=2, epochs=2, verbose=0)

    assert len(calls) == 1


def test_optimizer_built_before_first_step():
    classifier, calls = recorded_classifier()
    x, y = training_data(batches=2)

    classifier.fit(x, y, batch_size=2, epochs=1, verbose=0)

    assert calls[0]["optimizer_built"]
    # AdamW keeps two moments per trainable variable, plus its own counters.
    assert calls[0]["variables"] >= 2 * len(classifier.trainable_variables)


def test_fit_sees_every_batch():
    classifier = adapted_classifier()
    compile_with_metrics(classifier)
    x, y = training_data(batches=3)
    seen = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(batch))

    classifier.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[counter])

    assert seen == [0, 1, 2, 0, 1, 2]


@TRACED
def test_evaluate_then_fit_traces_once():
    classifier, calls = recorded_classifier(jit_compile=True)
    x, y = training_data(batches=2)

    before = classifier.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    classifier.fit(x, y, batch_size=2, epochs=1, verbose=0)
    classifier.fit(x, y, batch_size=2, epochs=1, verbose=0)

    assert np.isfinite(before["loss"])
    assert len(calls) == 1


def test_train_on_batch_builds_then_trains():
    classifier, calls = recorded_classifier()
    x, y = training_data(batches=1)
    lora_b = next(v for v in classifier.trainable_variables if v.path.endswith("lora_kernel_b"))
    start = keras.ops.convert_to_numpy(lora_b).copy()

    classifier.train_on_batch(x, y)
    classifier.train_on_batch(x, y)

    assert calls[0]["optimizer_built"]
    assert not np.allclose(keras.ops.convert_to_numpy(lora_b), start)


@ONLY_TENSORFLOW
def test_hook_removed_with_last_method():
    classifier = tiny_models.bert_classifier()
    assert not training_build.is_installed(classifier)

    keras_peft.apply(classifier, keras_peft.LoRA(rank=2, targets=["query"]))
    assert training_build.is_installed(classifier)
    keras_peft.apply(classifier, keras_peft.BiasOnly())
    keras_peft.remove(classifier)
    assert not training_build.is_installed(classifier)
    assert "_maybe_symbolic_build" not in vars(classifier)

    keras_peft.apply(classifier, keras_peft.LoRA(rank=2, targets=["query"]))
    keras_peft.merge(classifier)
    assert not training_build.is_installed(classifier)


@ONLY_TENSORFLOW
def test_failed_apply_installs_nothing():
    classifier = tiny_models.bert_classifier()

    with pytest.raises(ValueError):
        keras_peft.apply(classifier, keras_peft.LoRA(rank=2, targets=["no_such_layer"]))

    assert not training_build.is_installed(classifier)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="checks the backends without the hook")
def test_nothing_is_installed_outside_tensorflow():
    classifier = adapted_classifier()

    assert not training_build.is_installed(classifier)
    assert "_maybe_symbolic_build" not in vars(classifier)


@ONLY_TENSORFLOW
def test_uninstall_puts_back_an_instance_hook():
    model = tiny_models.bert_classifier()
    calls = []

    def own_hook(iterator=None, data_batch=None):
        calls.append(data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", own_hook)
    training_build.install(model)
    training_build.install(model)
    assert vars(model)["_maybe_symbolic_build"] is not own_hook

    training_build.uninstall(model)
    assert vars(model)["_maybe_symbolic_build"] is own_hook
    training_build.uninstall(model)
    assert vars(model)["_maybe_symbolic_build"] is own_hook


def test_apply_after_evaluate_raises():
    classifier = adapted_classifier()
    compile_with_metrics(classifier)
    x, y = training_data(batches=1)
    classifier.evaluate(x, y, verbose=0)

    with pytest.raises(RuntimeError, match="already has optimizer state .*evaluate"):
        keras_peft.apply(classifier, keras_peft.BiasOnly())

    # The fix that the message names.
    compile_with_metrics(classifier)
    keras_peft.apply(classifier, keras_peft.BiasOnly())
    classifier.fit(x, y, verbose=0)
