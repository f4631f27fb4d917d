"""Errors the pipeline raises about its input data."""


class SampleDecodeError(RuntimeError):
    """An image inside a shard (or folder) that cannot be decoded; the message names it."""
