"""Method objects: descriptions of what each PEFT method changes in a model."""

from keras_peft.methods.adapter import Adapter
from keras_peft.methods.base import Method
from keras_peft.methods.bitfit import BiasOnly
from keras_peft.methods.diff import DiffTuning
from keras_peft.methods.lora import LoRA

__all__ = ["Adapter", "BiasOnly", "DiffTuning", "Method", "LoRA"]
