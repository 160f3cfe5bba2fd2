"""Worker: what `import keras_peft` adds to a process that imported keras.

Records the resident memory before and after the import, which backend
packages and whether `keras_hub` the import brought in, and for each of
them the keras_peft module whose import triggered it.
"""

import importlib.abc
import sys
import time

import measure

WATCHED = ("tensorflow", "jax", "torch", "keras_hub")


class _ImportRecorder(importlib.abc.MetaPathFinder):
    """Record, for each watched top-level package, the keras_peft module importing it."""

    def __init__(self):
        self.importers = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname in WATCHED and fullname not in self.importers:
            frame = sys._getframe(1)
            importer = None
            while frame is not None:
                module = frame.f_globals.get("__name__", "")
                if module.startswith("keras_peft"):
                    importer = module
                    break
                frame = frame.f_back
            self.importers[fullname] = importer
        return None


def run(config):
    before_keras = measure.current_rss_mb()
    import keras

    loaded_by_keras = sorted(name for name in WATCHED if name in sys.modules)
    rss_keras = measure.current_rss_mb()
    loaded_before = set(sys.modules)

    recorder = _ImportRecorder()
    sys.meta_path.insert(0, recorder)
    start = time.perf_counter()
    import keras_peft  # noqa: F401

    seconds = time.perf_counter() - start
    sys.meta_path.remove(recorder)
    rss_peft = measure.current_rss_mb()
    new_modules = set(sys.modules) - loaded_before
    added = sorted(name for name in WATCHED if name in new_modules)
    return {
        "backend": keras.backend.backend(),
        "rss_start_mb": before_keras,
        "rss_after_keras_mb": rss_keras,
        "rss_after_keras_peft_mb": rss_peft,
        "import_seconds": seconds,
        "packages_loaded_by_keras": loaded_by_keras,
        "packages_added_by_keras_peft": added,
        "importers": {name: recorder.importers.get(name) for name in added},
        "keras_peft_modules": len([m for m in new_modules if m.startswith("keras_peft")]),
    }
