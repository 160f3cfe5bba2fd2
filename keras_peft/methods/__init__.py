"""Method objects: descriptions of what each PEFT method changes in a model."""

from keras_peft.methods.base import Method
from keras_peft.methods.lora import LoRA

__all__ = ["Method", "LoRA"]
