"""Target matching: which layers of a model a method adapts.

A target is one of:

- a role name known for KerasHub transformers (`"query"`, `"key"`,
  `"value"`, `"attention_output"`, `"ffn_intermediate"`, `"ffn_gate"`,
  `"ffn_output"`), which selects that projection in every attention layer or
  block of any KerasHub family;
- a path string: an exact path, a path suffix made of whole segments
  (`"self_attention/query"` or `"query"`), or a glob on the full path
  (`"*/transformer_layer_[01]/*/query"`);
- a compiled regular expression (`re.compile(...)`), searched with
  `fullmatch` on the full path;
- a layer class such as `keras.layers.Dense`, which matches its instances.

The same forms work in `exclude`.
"""

import fnmatch
import re

import keras

from keras_peft.hub import roles

_GLOB_CHARACTERS = set("*?[")


def describe_target(target):
    if isinstance(target, re.Pattern):
        return f"re.compile({target.pattern!r})"
    if isinstance(target, type):
        return target.__name__
    return repr(target)


def check_targets(targets, name="targets"):
    """Validate a list of targets and return it as a tuple."""
    if isinstance(targets, (str, re.Pattern, type)):
        targets = [targets]
    if targets is None:
        return ()
    try:
        targets = tuple(targets)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a list of role names, path patterns, compiled "
            f"regular expressions or layer classes. Received: {name}={targets!r}"
        ) from None
    for target in targets:
        valid = (
            (isinstance(target, str) and target)
            or isinstance(target, re.Pattern)
            or (isinstance(target, type) and issubclass(target, keras.layers.Layer))
        )
        if not valid:
            raise TypeError(
                f"Each entry of `{name}` must be a non-empty string, a compiled "
                f"regular expression or a keras.layers.Layer subclass. Received: "
                f"{target!r} in {name}={list(targets)!r}"
            )
    return targets


def _raw_path(index, entry):
    """Path built from the real layer names, which users see in `model.summary()`."""
    names = []
    current = entry
    while current is not None and current.layer is not index.model:
        names.append(current.layer.name)
        current = index.entry_of(current.parent)
    return "/".join(reversed(names))


def _path_matches(pattern, path):
    if pattern == path or path.endswith("/" + pattern):
        return True
    if _GLOB_CHARACTERS & set(pattern):
        return fnmatch.fnmatchcase(path, pattern)
    return False


def _matches(target, index, entry):
    if isinstance(target, type):
        return isinstance(entry.layer, target)
    if isinstance(target, re.Pattern):
        return bool(target.fullmatch(entry.path) or target.fullmatch(_raw_path(index, entry)))
    return _path_matches(target, entry.path) or _path_matches(target, _raw_path(index, entry))


def _role_matches(role, index):
    found = []
    for entry in index:
        for _, _, sublayer in roles.role_layers(entry.layer, role):
            sub_entry = index.entry_of(sublayer)
            if sub_entry is not None:
                found.append(sub_entry)
    return found


def match_targets(index, targets, exclude=(), skip=None):
    """Return `{target: [entries]}` in model order for each target.

    Args:
        index: a `LayerIndex`.
        targets: validated targets.
        exclude: validated targets whose matches are removed.
        skip: optional predicate; entries for which it returns True are never
            matched (for example layers inside a wrapper).
    """
    excluded = set()
    for target in exclude:
        for entry in index:
            if _matches(target, index, entry):
                excluded.add(id(entry.layer))
        role = roles.canonical_role(target) if isinstance(target, str) else None
        if role is not None:
            excluded.update(id(e.layer) for e in _role_matches(role, index))

    result = {}
    for target in targets:
        found = []
        role = roles.canonical_role(target) if isinstance(target, str) else None
        if role is not None:
            found.extend(_role_matches(role, index))
        seen = {id(e.layer) for e in found}
        for entry in index:
            if id(entry.layer) not in seen and _matches(target, index, entry):
                found.append(entry)
                seen.add(id(entry.layer))
        found = [
            e for e in found if id(e.layer) not in excluded and not (skip is not None and skip(e))
        ]
        order = {id(e.layer): i for i, e in enumerate(index.entries)}
        found.sort(key=lambda e: order[id(e.layer)])
        result[target] = found
    return result


def no_match_message(target, index, method_name, limit=12):
    """Build the error message for a target that matched nothing."""
    weighted = [
        e.path
        for e in index
        if index.owned_variables(e) and not getattr(e.parent, "_keras_peft_wrapper", False)
    ]
    shown = weighted[:limit]
    more = "" if len(weighted) <= limit else f" ... ({len(weighted) - limit} more)"
    hint = ""
    if isinstance(target, str) and roles.canonical_role(target) is not None:
        hint = (
            f" {target!r} is a role name, but no attention layer or transformer "
            "block of this model has such a projection (a fused q/k/v projection "
            "is targeted by its path)."
        )
    return (
        f"{method_name} target {describe_target(target)} matched no layer of "
        f"model {index.model.name!r}.{hint} Layers with weights include: "
        f"{', '.join(shown)}{more}. Use one of these paths, a glob such as "
        "'*/query', a role name ('query', 'key', 'value', 'attention_output', "
        "'ffn_intermediate', 'ffn_gate', 'ffn_output') or a layer class."
    )
