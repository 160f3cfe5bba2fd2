"""Keras layers that implement the PEFT methods."""

from keras_peft.layers.adapter_block import AdapterBlock
from keras_peft.layers.lora_dense import LoRADense

__all__ = ["AdapterBlock", "LoRADense"]
