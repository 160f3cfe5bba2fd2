"""Reading non-trainable model variables inside Keras' JAX train step.

Keras' JAX trainer passes every model variable into the jitted train step as
an argument and runs the optimizer step in a stateless scope that contains only
the trainable and optimizer variables. During `fit` it also empties the
values of the model's variables (they live in the state the step returns).
A constraint that reads a non-trainable model variable, such as W_0 in
`DiffConstraint`, therefore cannot see it through the variable itself.

`watch(model, variables)` makes those values visible to `current_value` on
JAX, in two ways:

- It wraps `model.train_step`, so that while a step of `model` is traced or
  run, `current_value` returns the value the step received for each of the
  model's non-trainable variables (`fit` and `train_on_batch` of `model`).
- It wraps `model.call`, which records the values of `variables` that the
  forward pass reads. This covers a larger model that contains `model` (a
  KerasHub task around a watched backbone): its train step runs the forward
  pass, which includes `model`, before the optimizer step.

The value is then an argument of the compiled program, not a constant baked
into it. On TensorFlow and PyTorch the train step reads variables in place
and nothing is wrapped.
"""

import keras

# Keras exposes no public way to read the stateless scope's mapping.
from keras.src.backend.common.stateless_scope import get_stateless_scope
from keras.src.backend.common.stateless_scope import in_stateless_scope

_STEP_VALUES = []
_FORWARD_VALUES = {}
_WATCH = "_keras_peft_watch"


def current_value(variable):
    """Return the value of `variable` in the running JAX train step, or `None`.

    `None` means the variable can be read as usual.
    """
    for values in reversed(_STEP_VALUES):
        value = values.get(id(variable))
        if value is not None:
            return value
    if getattr(variable, "_value", 0) is None:
        # Emptied by the JAX trainer of a model that contains the watched
        # one: the forward pass of this step recorded the value.
        return _FORWARD_VALUES.get(id(variable))
    return None


def _record_forward_values(watched):
    if not in_stateless_scope():
        return
    scope = get_stateless_scope()
    for key, variable in watched.items():
        value = scope.get_current_value(variable)
        if value is not None:
            _FORWARD_VALUES[key] = value


def watch(model, variables):
    """Let `current_value` see `variables` of `model` inside JAX train steps.

    Each call must be paired with `unwatch(model, variables)`; the wrappers
    are installed once and removed when no variable is watched any more.
    Does nothing on other backends.
    """
    if keras.backend.backend() != "jax":
        return
    record = model.__dict__.get(_WATCH)
    if record is None:
        record = {"variables": {}, "train_step": model.__dict__.get("train_step"),
                  "call": model.__dict__.get("call")}
        _install(model, record)
        object.__setattr__(model, _WATCH, record)
    record["variables"].update((id(v), v) for v in variables)


def _install(model, record):
    own_train_step = record["train_step"]
    own_call = record["call"]

    def train_step(state, data):
        values = {id(v): value for v, value in zip(model.non_trainable_variables, state[1])}
        _STEP_VALUES.append(values)
        try:
            if own_train_step is not None:
                return own_train_step(state, data)
            return type(model).train_step(model, state, data)
        finally:
            _STEP_VALUES.pop()

    def call(*args, **kwargs):
        _record_forward_values(record["variables"])
        if own_call is not None:
            return own_call(*args, **kwargs)
        return type(model).call(model, *args, **kwargs)

    object.__setattr__(model, "train_step", train_step)
    object.__setattr__(model, "call", call)
    # A train function made before the wrapper would not use it.
    model.train_function = None


def is_watched(model):
    """Return whether `watch` wrapped `model`'s train step and call."""
    return _WATCH in model.__dict__


def unwatch(model, variables):
    """Stop watching `variables`; the last one puts `train_step` and `call` back."""
    record = model.__dict__.get(_WATCH)
    if record is None:
        return
    for variable in variables:
        record["variables"].pop(id(variable), None)
        _FORWARD_VALUES.pop(id(variable), None)
    if record["variables"]:
        return
    for name in ("train_step", "call"):
        if record[name] is None:
            object.__delattr__(model, name)
        else:
            object.__setattr__(model, name, record[name])
    object.__delattr__(model, _WATCH)
    model.train_function = None
