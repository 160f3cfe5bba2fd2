"""Applying methods to a model, and undoing or merging them.

The state of a patched model (the applied methods, their edits, the task
head, and every variable's `trainable` flag before the first `apply`) is kept
on the model in `_keras_peft_state`, a plain attribute that Keras neither
tracks nor saves.
"""

import warnings

import keras

from keras_peft.core import training_build
from keras_peft.core.paths import LayerIndex
from keras_peft.core.report import Report
from keras_peft.core.report import count_parameters
from keras_peft.errors import KerasPeftWarning
from keras_peft.errors import UnsavedAdapterError
from keras_peft.methods.base import Method

_STATE_ATTRIBUTE = "_keras_peft_state"
_SAVING_METHODS = ("save", "save_to_preset")
_COMPILED_FUNCTIONS = ("train_function", "test_function", "predict_function", "generate_function")


class Application:
    """One method applied to a model, with the edits that realised it."""

    def __init__(self, method, edits):
        self.method = method
        self.edits = edits


class PeftState:
    def __init__(self, original_trainable, train_head, architecture):
        # {id(variable): (variable, trainable flag before the first apply)}
        self.original_trainable = original_trainable
        self.train_head = train_head
        # (class name, config, fingerprint) of the model before the first apply.
        self.architecture = architecture
        self.applications = []
        self.guarded_layers = []

    def edits(self):
        return [edit for application in self.applications for edit in application.edits]


def get_state(model):
    return vars(model).get(_STATE_ATTRIBUTE)


def _set_state(model, state):
    if state is None:
        vars(model).pop(_STATE_ATTRIBUTE, None)
    else:
        object.__setattr__(model, _STATE_ATTRIBUTE, state)


def check_model(model, function_name):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"keras_peft.{function_name} expects a keras.Model (a KerasHub task or "
            f"backbone, or your own model). Received: {model!r} of type "
            f"{type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built. Call it once on data (or build "
            f"it) before keras_peft.{function_name}."
        )


def _optimizer_has_state(model):
    optimizer = getattr(model, "optimizer", None)
    return optimizer is not None and getattr(optimizer, "built", False)


def _check_not_trained(model, function_name):
    """Raise unless the model's optimizer is still unbuilt."""
    # Keras 3.15 does not follow a change of trainable variables once the
    # optimizer is built: JAX raises at the next step, TensorFlow keeps
    # updating frozen weights and torch follows the change. Refuse instead.
    if _optimizer_has_state(model):
        raise RuntimeError(
            f"Model {model.name!r} already has optimizer state for its current "
            "trainable variables (Keras creates it in the first fit, evaluate, "
            "train_on_batch or test_on_batch after compile), and Keras does not "
            "follow a change of them on every backend. Call model.compile(...) "
            f"again with a new optimizer instance, then keras_peft.{function_name}(...), "
            "then fit."
        )


def reset_compiled_functions(model):
    """Drop functions that Keras and KerasHub traced for the old structure."""
    for layer in [model] + [entry.layer for entry in LayerIndex(model)]:
        if isinstance(layer, keras.Model):
            for name in _COMPILED_FUNCTIONS:
                if vars(layer).get(name) is not None:
                    setattr(layer, name, None)


def task_head_entries(model, index):
    """Return the entries of layers with weights outside a task's backbone.

    For a KerasHub task (a model with a `backbone` attribute) these are the
    layers the task added, such as a classifier's output layer. Other models
    have no head.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, keras.layers.Layer):
        return []
    backbone_entry = index.entry_of(backbone)
    if backbone_entry is None:
        return []
    prefix = backbone_entry.path + "/"
    # A head layer that a method wrapped (LoRA on the output layer, say) is
    # trained through the method's own variables, so it is not listed here.
    return [
        entry
        for entry in index
        if entry.layer is not backbone
        and not entry.path.startswith(prefix)
        and index.owned_variables(entry)
        and not getattr(entry.layer, "_keras_peft_wrapper", False)
        and not getattr(entry.parent, "_keras_peft_wrapper", False)
    ]


def _head_variables(model, index, state):
    if not state.train_head:
        return []
    variables = []
    for entry in task_head_entries(model, index):
        variables.extend(index.owned_variables(entry))
    return variables


def _set_trainable_flags(model, state):
    index = LayerIndex(model)
    trainable_ids = set()
    for edit in state.edits():
        trainable_ids.update(id(v) for v in edit.trainable_variables())
    trainable_ids.update(id(v) for v in _head_variables(model, index, state))
    for variable in model.weights:
        original = state.original_trainable.get(id(variable), (variable, True))[1]
        variable.trainable = id(variable) in trainable_ids and original


def _restore_trainable_flags(state):
    for variable, flag in state.original_trainable.values():
        variable.trainable = flag


def _unsaved_adapter_config(layer, state):
    def get_config():
        kinds = ", ".join(repr(a.method) for a in state.applications)
        raise UnsavedAdapterError(
            f"Layer {layer.name!r} contains keras_peft adapters ({kinds}) that its "
            "config does not record, so a .keras file or preset saved now would "
            "load back without them. Save the adapter with "
            "keras_peft.save_adapter(model, folder), or call keras_peft.merge(model) "
            "first to get a plain model that saves normally."
        )

    return get_config


def _install_config_guards(model, state):
    """Make `get_config` raise on the model and on every layer above an edit.

    KerasHub configs hold constructor arguments only, so a saved config would
    rebuild the model without its wrappers and its weights would not fit.
    """
    _remove_config_guards(state)
    index = LayerIndex(model)
    guarded = {id(model): model}
    for edit in state.edits():
        entry = index.get(edit.path)
        while entry is not None:
            parent = entry.parent
            if parent is None:
                break
            if not getattr(parent, "_keras_peft_wrapper", False):
                guarded[id(parent)] = parent
            entry = index.entry_of(parent)
    for layer in guarded.values():
        raise_error = _unsaved_adapter_config(layer, state)
        object.__setattr__(layer, "get_config", raise_error)
        # `save` and `save_to_preset` write files before they ask for the
        # config; raise before anything is written.
        if isinstance(layer, keras.Model):
            for name in _SAVING_METHODS:
                if hasattr(layer, name):
                    object.__setattr__(layer, name, _raise_before_saving(raise_error))
    state.guarded_layers = list(guarded.values())


def _raise_before_saving(raise_error):
    def save(*args, **kwargs):
        raise_error()

    return save


def _remove_config_guards(state):
    for layer in state.guarded_layers:
        for name in ("get_config",) + _SAVING_METHODS:
            vars(layer).pop(name, None)
    state.guarded_layers = []


def _check_conflicts(state, planned):
    taken = {}
    if state is not None:
        for application in state.applications:
            for edit in application.edits:
                if edit.exclusive:
                    taken[edit.path] = application.method
    for method, edits in planned:
        for edit in edits:
            if not edit.exclusive:
                continue
            if edit.path in taken:
                other = taken[edit.path]
                raise ValueError(
                    f"Layer {edit.path!r} would be changed twice: by {other!r} and "
                    f"by {method!r}. Each layer takes one such method; exclude the "
                    "path from one of them, or call keras_peft.remove(model) first."
                )
            taken[edit.path] = method


def apply(model, *methods, train_head=True):
    """Apply one or more PEFT methods to a built Keras model, in place.

    Every method first plans its edits and checks them (targets exist, layer
    types fit, nothing is changed twice); only then is the model changed. If
    any edit fails, all edits of this call are undone and the trainable
    flags restored, so the model is left as it was.

    After `apply`, only the variables the methods add or select train, plus
    the task head: for a KerasHub task, the layers outside its backbone (a
    classifier's output layer, for instance), which are also saved with the
    adapter. Call `apply` before `compile`. A model whose optimizer already
    has state is rejected, because Keras does not follow a change of
    trainable variables after that on every backend. A model compiled but
    not trained is fine: its traced functions are reset.

    Args:
        model: a built `keras.Model`, such as a KerasHub task or backbone.
        *methods: method objects such as `keras_peft.LoRA(...)`.
        train_head: whether a KerasHub task's head stays trainable. Defaults
            to `True`. Ignored after the first `apply` on a model.

    Returns:
        A `Report` of the adapted paths and trainable parameter counts.
    """
    return apply_methods(model, methods, train_head=train_head, function_name="apply")


def apply_methods(model, methods, train_head, function_name):
    """Apply `methods`; `function_name` is the public function named in errors."""
    check_model(model, function_name)
    if not isinstance(train_head, bool):
        raise TypeError(f"`train_head` must be True or False. Received: train_head={train_head!r}")
    if not methods:
        raise ValueError("keras_peft.apply needs at least one method, e.g. keras_peft.LoRA(rank=8).")
    for method in methods:
        if not isinstance(method, Method):
            raise TypeError(
                "keras_peft.apply takes method objects such as keras_peft.LoRA(rank=8). "
                f"Received: {method!r} of type {type(method).__name__}"
            )
    _check_not_trained(model, function_name)

    state = get_state(model)
    index = LayerIndex(model)
    planned = [(method, method.plan(model, index)) for method in methods]
    _check_conflicts(state, planned)

    new_state = state is None
    if new_state:
        original = {id(v): (v, v.trainable) for v in model.weights}
        from keras_peft.saving import architecture_of

        state = PeftState(original, train_head=bool(train_head), architecture=architecture_of(model))
    flags_before = {id(v): (v, v.trainable) for v in model.weights}
    applications_before = len(state.applications)

    done = []
    try:
        for _, edits in planned:
            for edit in edits:
                edit.apply()
                done.append(edit)
        state.applications.extend(Application(method, edits) for method, edits in planned)
        _set_trainable_flags(model, state)
    except BaseException:
        for edit in reversed(done):
            edit.undo()
        del state.applications[applications_before:]
        for variable, flag in flags_before.values():
            variable.trainable = flag
        raise

    _set_state(model, state)
    _install_config_guards(model, state)
    training_build.install(model)
    reset_compiled_functions(model)
    return summary(model)


def rollback(model, applications_before):
    """Undo the applications made after the first `applications_before` ones."""
    state = get_state(model)
    if state is None:
        return
    for application in reversed(state.applications[applications_before:]):
        for edit in reversed(application.edits):
            edit.undo()
    del state.applications[applications_before:]
    if not state.applications:
        _detach(model, state)
    else:
        _set_trainable_flags(model, state)
        _install_config_guards(model, state)
    reset_compiled_functions(model)


def _detach(model, state):
    """Restore the trainable flags and remove everything keras_peft set on the model."""
    _restore_trainable_flags(state)
    _remove_config_guards(state)
    training_build.uninstall(model)
    _set_state(model, None)


def _finish(model, state, action):
    _detach(model, state)
    reset_compiled_functions(model)
    if _optimizer_has_state(model):
        model.compiled = False
        warnings.warn(
            f"keras_peft.{action} changed which variables of the trained model "
            f"{model.name!r} train, so its compile state was cleared. Call "
            "model.compile(...) with a new optimizer before training it again.",
            KerasPeftWarning,
            stacklevel=3,
        )


def _require_state(model, function_name):
    check_model(model, function_name)
    state = get_state(model)
    if state is None:
        raise ValueError(
            f"keras_peft.{function_name} needs a model with keras_peft methods applied, "
            f"but model {model.name!r} has none. Call keras_peft.apply(model, method) first."
        )
    return state


def remove(model):
    """Undo every applied method: put back the original layers and trainable flags.

    The base weights are unchanged; what the adapters learned is dropped. A
    task head that was trained keeps its trained weights.
    """
    state = _require_state(model, "remove")
    for edit in reversed(state.edits()):
        edit.undo()
    _finish(model, state, "remove")


def merge(model):
    """Fold every adapter into its base layer and put the plain layers back.

    Afterwards the model is an ordinary Keras or KerasHub model again (its
    `save` and `save_to_preset` work and load without keras_peft) that
    computes what the adapted model computed. Methods with nothing to fold
    (prompts and prefixes that are not weights of the base model) raise
    `NotImplementedError` here before anything changes.
    """
    state = _require_state(model, "merge")
    for application in state.applications:
        check = getattr(application.method, "check_mergeable", None)
        if check is not None:
            check()
    for edit in state.edits():
        check = getattr(edit, "check_mergeable", None)
        if check is not None:
            check()
    for edit in reversed(state.edits()):
        edit.merge()
    _finish(model, state, "merge")


def summary(model):
    """Return a `Report` for a model that has keras_peft methods applied."""
    state = _require_state(model, "summary")
    index = LayerIndex(model)
    adapted = {}
    for application in state.applications:
        paths = adapted.setdefault(repr(application.method), [])
        paths.extend(edit.path for edit in application.edits)
    references = {id(v) for e in state.edits() for v in e.reference_variables()}
    trainable = {}
    for entry in index:
        for variable in index.owned_variables(entry):
            if variable.trainable:
                trainable[f"{entry.path}/{variable.name}"] = count_parameters([variable])
    head = [entry.path for entry in task_head_entries(model, index)] if state.train_head else []
    return Report(
        model_name=model.name,
        methods=[repr(a.method) for a in state.applications],
        adapted_paths=adapted,
        head_paths=head,
        trainable_variables=trainable,
        trainable_parameters=count_parameters(model.trainable_weights),
        total_parameters=count_parameters(
            [v for v in model.weights if id(v) not in references]
        ),
    )
