"""Building training state before TensorFlow traces the train step.

At the start of `fit`, `evaluate`, `train_on_batch` and `test_on_batch`,
Keras' JAX and torch trainers build the model's compiled loss, compiled
metrics and optimizer from symbolic inputs. Keras 3.15's TensorFlow trainer
does this only under a distribution strategy. Otherwise those variables are
created inside the first trace of the step, and `tf.function` traces the step
a second time. The second trace costs compile time and, for an adapted model,
tens of MiB that stay allocated (docs/benchmarks.md, "Earlier runs").

`install(model)` makes the TensorFlow trainer of `model` build that state
first, as the other trainers do. keras_peft installs it on every model it
adapts and takes it away with the last method. On JAX and torch it does
nothing.
"""

import keras

_HOOK = "_maybe_symbolic_build"
_RECORD = "_keras_peft_training_build"


def _needs_data(model):
    """Return whether building the model's training state needs an input batch."""
    if not all(layer.built for layer in model._flatten_layers()):
        return True
    for compiled in (model._compile_loss, model._compile_metrics):
        if compiled is not None and not compiled.built:
            return True
    return False


def _first_batch(iterator):
    """Return the first batch of Keras' TensorFlow epoch iterator, or `None`.

    The iterator yields (first step, last step, batches). The trainer resets
    it after this hook, so taking a batch here skips nothing in training.
    """
    for _, _, batches in iterator:
        return next(batches)
    return None


def build_before_trace(model, iterator=None, data_batch=None):
    """Build the loss, metrics and optimizer of `model` if any is unbuilt."""
    optimizer = model.optimizer
    optimizer_unbuilt = optimizer is not None and not optimizer.built
    needs_data = _needs_data(model)
    if not (optimizer_unbuilt or needs_data):
        return
    if needs_data and data_batch is None:
        if iterator is None:
            return
        data_batch = _first_batch(iterator)
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=data_batch)


def install(model):
    """Make `model`'s TensorFlow trainer build its training state before tracing.

    Does nothing on other backends, or when already installed.
    """
    if keras.backend.backend() != "tensorflow" or _RECORD in vars(model):
        return
    # The hook uses private Keras trainer methods. Without them, Keras keeps its own order.
    if not (hasattr(model, _HOOK) and hasattr(model, "_symbolic_build")):
        return
    own = vars(model).get(_HOOK)
    keras_hook = own if own is not None else getattr(model, _HOOK)

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if model._distribute_strategy is not None:
            # Keras builds everything itself under a distribution strategy.
            return keras_hook(iterator=iterator, data_batch=data_batch)
        build_before_trace(model, iterator=iterator, data_batch=data_batch)

    object.__setattr__(model, _RECORD, {"own": own})
    object.__setattr__(model, _HOOK, maybe_symbolic_build)


def is_installed(model):
    """Return whether `install` changed `model`."""
    return _RECORD in vars(model)


def uninstall(model):
    """Undo `install(model)`. Does nothing if it was not installed."""
    record = vars(model).get(_RECORD)
    if record is None:
        return
    if record["own"] is None:
        object.__delattr__(model, _HOOK)
    else:
        object.__setattr__(model, _HOOK, record["own"])
    object.__delattr__(model, _RECORD)
