"""keras_peft: parameter-efficient fine-tuning for Keras 3.

Methods are written once with `keras.ops` and run on TensorFlow, JAX and
PyTorch. Apply them to any built Keras model, KerasHub tasks included, and
train with plain `fit`.
"""

from keras_peft import constraints
from keras_peft import layers
from keras_peft.core.report import Report
from keras_peft.core.session import apply
from keras_peft.core.session import merge
from keras_peft.core.session import remove
from keras_peft.core.session import summary
from keras_peft.errors import AdapterFileError
from keras_peft.errors import KerasPeftWarning
from keras_peft.errors import UnsavedAdapterError
from keras_peft.methods.adapter import Adapter
from keras_peft.methods.bitfit import BiasOnly
from keras_peft.methods.diff import DiffTuning
from keras_peft.methods.lora import LoRA
from keras_peft.saving import load_adapter
from keras_peft.saving import save_adapter
from keras_peft.version import __version__

__all__ = [
    "Adapter",
    "AdapterFileError",
    "BiasOnly",
    "DiffTuning",
    "KerasPeftWarning",
    "LoRA",
    "Report",
    "UnsavedAdapterError",
    "__version__",
    "apply",
    "constraints",
    "layers",
    "load_adapter",
    "merge",
    "remove",
    "save_adapter",
    "summary",
]
