"""Adapter folders: `adapter_config.json` plus `adapter_model.safetensors`.

The config records the library, Keras and backend versions, the base model's
class and a fingerprint of its architecture, every applied method and the
adapted paths. The safetensors file contains the trained variables (adapter
weights and the task head) keyed by `<layer path>/<variable name>`.
safetensors runs no code when loading and is read the same way by every
backend, so a folder saved under one backend loads under the others.
"""

import hashlib
import json
import os
import tempfile

import keras
import numpy as np
import safetensors.numpy

from keras_peft.core import session
from keras_peft.core.paths import LayerIndex
from keras_peft.errors import AdapterFileError
from keras_peft.methods.base import method_from_config
from keras_peft.methods.base import serialize_method
from keras_peft.methods.base import variable_to_numpy
from keras_peft.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_NAME = "keras_peft.adapter"
FORMAT_VERSION = 1

# Config keys that do not change the architecture.
_IGNORED_CONFIG_KEYS = {"name", "trainable", "dtype", "preprocessor"}


def _clean_config(value):
    if isinstance(value, dict):
        return {k: _clean_config(v) for k, v in value.items() if k not in _IGNORED_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_clean_config(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def architecture_of(model):
    """Return `(class name, architecture config, fingerprint)` of an unpatched model.

    The fingerprint hashes the model's config without names, dtypes and the
    preprocessor. A model without a usable `get_config` is described by the
    classes and variable shapes of its layers instead.
    """
    try:
        config = _clean_config(type(model).get_config(model))
    except NotImplementedError:
        index = LayerIndex(model)
        config = {
            entry.path: [type(entry.layer).__name__]
            + [list(v.shape) for v in index.owned_variables(entry)]
            for entry in index
        }
    return type(model).__name__, config, _fingerprint(config)


def _fingerprint(architecture):
    text = json.dumps(architecture, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _config_differences(saved, current, prefix="", limit=8):
    """List keys whose values differ between two architecture configs."""
    differences = []
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            path = f"{prefix}.{key}" if prefix else key
            if key not in saved or key not in current:
                differences.append(f"{path}: saved {saved.get(key, '(absent)')!r}, model {current.get(key, '(absent)')!r}")
            else:
                differences.extend(_config_differences(saved[key], current[key], path, limit))
    elif saved != current:
        differences.append(f"{prefix}: saved {saved!r}, model {current!r}")
    return differences[:limit]


def _head_variables(model, state):
    variables = {}
    if state.train_head:
        index = LayerIndex(model)
        for entry in session.task_head_entries(model, index):
            for variable in index.owned_variables(entry):
                variables[f"{entry.path}/{variable.name}"] = variable
    return variables


def _tensors_to_save(model, state):
    """Return `{key: array}` for the adapter weights and the task head."""
    tensors = {}
    for edit in state.edits():
        for name, array in edit.export_tensors().items():
            tensors[f"{edit.path}/{name}"] = array
    for key, variable in _head_variables(model, state).items():
        tensors[key] = variable_to_numpy(variable)
    return tensors


def _check_folder_argument(folder, function_name):
    if not isinstance(folder, (str, os.PathLike)) or os.fspath(folder) in ("", b""):
        raise TypeError(
            f"keras_peft.{function_name} needs a folder path (a str or pathlib.Path). "
            f"Received: folder={folder!r}"
        )
    return os.fspath(folder)


def save_adapter(model, folder):
    """Write the applied methods and their trained variables to `folder`.

    `folder` is created if needed. An existing folder is reused only when it
    is empty or already contains an adapter, whose two files are then replaced;
    the new files are written beside them first and moved into place, so an
    error leaves the old adapter intact.

    Args:
        model: a model that `keras_peft.apply` changed.
        folder: path of the adapter folder.

    Returns:
        The list of saved keys.
    """
    state = session._require_state(model, "save_adapter")
    folder = _check_folder_argument(folder, "save_adapter")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"Cannot save the adapter to {folder!r}: it is a file, not a folder.")
    if os.path.isdir(folder):
        unrelated = sorted(set(os.listdir(folder)) - {CONFIG_NAME, WEIGHTS_NAME})
        if unrelated:
            raise FileExistsError(
                f"Folder {folder!r} already contains other files ({', '.join(unrelated[:5])}); "
                "save the adapter to an empty or new folder."
            )
    for application in state.applications:
        application.method.get_config()  # raises for targets that cannot be written

    tensors = _tensors_to_save(model, state)
    class_name, architecture, fingerprint = state.architecture
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "keras_peft_version": __version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "base_model": {
            "class_name": class_name,
            "fingerprint": fingerprint,
            "architecture": architecture,
        },
        "train_head": state.train_head,
        "methods": [serialize_method(a.method) for a in state.applications],
        "adapted_paths": [[edit.path for edit in a.edits] for a in state.applications],
        "variables": {key: list(array.shape) for key, array in tensors.items()},
    }

    os.makedirs(folder, exist_ok=True)
    staged = []
    try:
        for name, write in (
            (WEIGHTS_NAME, lambda path: safetensors.numpy.save_file(tensors, path, metadata={"format": "np"})),
            (CONFIG_NAME, lambda path: _write_json(config, path)),
        ):
            handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            os.close(handle)
            staged.append((temporary, os.path.join(folder, name)))
            write(temporary)
            # mkstemp creates files readable by the owner only; use the
            # permissions of an ordinary new file instead.
            os.chmod(temporary, 0o666 & ~_current_umask())
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)
    return sorted(tensors)


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(config, path):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, sort_keys=False)
        file.write("\n")


def read_adapter_config(folder):
    """Read and check `adapter_config.json` of an adapter folder."""
    folder = _check_folder_argument(folder, "load_adapter")
    if os.path.isfile(folder):
        raise NotADirectoryError(
            f"{folder!r} is a file; pass the adapter folder that keras_peft.save_adapter "
            "wrote (it contains adapter_config.json and adapter_model.safetensors)."
        )
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Adapter folder {folder!r} does not exist. Pass the folder that "
            "keras_peft.save_adapter wrote."
        )
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Adapter folder {folder!r} has no {CONFIG_NAME}; it is not a keras_peft adapter.")
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFileError(f"{path!r} is not valid JSON ({error}). Save the adapter again.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise AdapterFileError(f"{path!r} is not a keras_peft adapter config (missing 'format': {FORMAT_NAME!r}).")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path!r} has format version {config.get('format_version')}; this keras_peft "
            f"({__version__}) reads version {FORMAT_VERSION}. Upgrade keras_peft."
        )
    for key in ("base_model", "methods"):
        if key not in config:
            raise AdapterFileError(f"{path!r} has no {key!r} entry; the file is incomplete.")
    if not isinstance(config["methods"], list) or not config["methods"]:
        raise AdapterFileError(f"{path!r} lists no methods; the file is incomplete or was edited.")
    base_model = config["base_model"]
    if not isinstance(base_model, dict) or "architecture" not in base_model:
        raise AdapterFileError(f"{path!r} has no base model architecture; the file is incomplete.")
    recorded = _fingerprint(base_model["architecture"])
    if recorded != base_model.get("fingerprint"):
        raise AdapterFileError(
            f"{path!r} is inconsistent: its architecture hashes to {recorded}, but its "
            f"fingerprint says {base_model.get('fingerprint')}. The file was edited or damaged."
        )
    return config


def _read_tensors(folder):
    path = os.path.join(os.fspath(folder), WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Adapter folder {os.fspath(folder)!r} has no {WEIGHTS_NAME}.")
    try:
        return safetensors.numpy.load_file(path)
    except Exception as error:  # safetensors raises its own error types for bad files
        raise AdapterFileError(
            f"{path!r} could not be read as safetensors ({type(error).__name__}: {error}); "
            "the file is truncated or corrupted. Save the adapter again."
        ) from None


def _check_architecture(model, config):
    saved = config["base_model"]
    state = session.get_state(model)
    class_name, architecture, fingerprint = (
        state.architecture if state is not None else architecture_of(model)
    )
    if saved.get("class_name") != class_name or saved.get("fingerprint") != fingerprint:
        differences = _config_differences(saved.get("architecture"), architecture)
        details = "; ".join(differences) if differences else "no config key differs"
        raise AdapterFileError(
            f"The adapter was saved from a {saved.get('class_name')} with architecture "
            f"fingerprint {saved.get('fingerprint')}, but the model is a {class_name} with "
            f"fingerprint {fingerprint} ({details}). Load it into a model built the same way."
        )


def _check_tensor_values(key, array):
    """Reject tensors that no trained float variable can hold."""
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise AdapterFileError(
                f"Tensor {key!r} in the adapter file contains NaN or infinite values; "
                "the adapter is damaged or its training diverged."
            )
    elif not key.endswith("_indices"):
        raise AdapterFileError(
            f"Tensor {key!r} in the adapter file has dtype {array.dtype}, but adapter "
            "weights are floating point; the file was edited or damaged."
        )


def load_adapter(model, folder):
    """Apply the methods recorded in `folder` to `model` and load their weights.

    The model must be built the same way as the one that was saved (same
    class and architecture config; the backend may differ). Everything is
    checked before the first weight is written: the config, the
    architecture fingerprint, and the name and shape of every tensor. On any
    error the model is left as it was.

    Returns:
        The `Report` of the applied methods.
    """
    session.check_model(model, "load_adapter")
    config = read_adapter_config(folder)
    tensors = _read_tensors(folder)
    try:
        methods = [method_from_config(entry) for entry in config["methods"]]
    except (TypeError, ValueError) as error:
        raise AdapterFileError(f"The adapter config lists an invalid method: {error}") from None
    _check_architecture(model, config)

    state_before = session.get_state(model)
    applications_before = 0 if state_before is None else len(state_before.applications)
    train_head = config.get("train_head", True)
    if not isinstance(train_head, bool):
        raise AdapterFileError(f"The adapter config has an invalid train_head value {train_head!r}.")
    report = session.apply_methods(model, methods, train_head=train_head, function_name="load_adapter")
    try:
        state = session.get_state(model)
        new_edits = [edit for a in state.applications[applications_before:] for edit in a.edits]
        expected = {}
        for edit in new_edits:
            for name, shape in edit.expected_shapes().items():
                expected[f"{edit.path}/{name}"] = tuple(shape)
        head = _head_variables(model, state)
        expected.update({key: tuple(v.shape) for key, v in head.items()})
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AdapterFileError(
                "The adapter weights do not match the model: "
                f"missing from the file: {missing[:6]}; not in the model: {unexpected[:6]}."
            )
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise AdapterFileError(
                    f"Tensor {key!r} has shape {tuple(tensors[key].shape)} in the adapter file "
                    f"but {shape} in the model (a different rank or size?)."
                )
            _check_tensor_values(key, tensors[key])
        # Inside the try: an edit may reject tensor values (out-of-range
        # sparse indices, say), and the rollback then undoes every edit.
        for edit in new_edits:
            edit.import_tensors({name: tensors[f"{edit.path}/{name}"] for name in edit.expected_shapes()})
    except BaseException:
        session.rollback(model, applications_before)
        raise
    for key, variable in head.items():
        variable.assign(tensors[key])
    return report

