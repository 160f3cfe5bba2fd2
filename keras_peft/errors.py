"""The warning class and the error types of keras_peft."""


class KerasPeftWarning(UserWarning):
    """Warnings from keras_peft: the call succeeded, and there is something to act on."""


class UnsavedAdapterError(ValueError):
    """Raised when a model is serialised whose config does not record its adapters."""


class AdapterFileError(ValueError):
    """Raised when an adapter folder is missing, unreadable or does not fit the model."""
