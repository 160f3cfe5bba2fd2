"""Keras layers that implement the PEFT methods."""

from keras_peft.layers.lora_dense import LoRADense

__all__ = ["LoRADense"]
