"""Helpers shared by the layers that wrap an existing layer (`base_layer`)."""


def build_base_layer(wrapper, input_shape):
    """Build `wrapper.base_layer` for `input_shape` unless it is built already.

    Raises `ValueError` when the base layer is not built and `input_shape`
    is `None`, because the wrapper then cannot know the base layer's shapes.
    """
    if wrapper.base_layer.built:
        return
    if input_shape is None:
        raise ValueError(
            f"{type(wrapper).__name__} {wrapper.name!r} needs an input shape because "
            "its base layer is not built yet."
        )
    wrapper.base_layer.build(input_shape)
