"""Argument types shared by the benchmark scripts."""

import argparse


def int_at_least(minimum):
    """Return an argparse type that accepts integers of `minimum` or more."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, received {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, received {value}")
        return value

    return parse
