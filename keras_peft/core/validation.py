"""Argument checks shared by the layers and the method objects."""

import numbers


def check_rank(rank, name="rank"):
    """Raise `ValueError` unless `rank` is a positive int (bools rejected)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(
            f"`{name}` must be a positive integer, such as 8. Received: {name}={rank!r}"
        )


def check_alpha(alpha):
    """Raise `ValueError` unless `alpha` is a finite number greater than 0."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not alpha > 0
        or alpha == float("inf")
    ):
        raise ValueError(
            "`alpha` must be a finite number greater than 0 (the update is "
            f"scaled by alpha / rank). Received: alpha={alpha!r}"
        )


def check_dropout(dropout):
    """Raise `ValueError` unless `dropout` is a number in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(
            f"`dropout` must be a number in [0, 1). Received: dropout={dropout!r}"
        )
