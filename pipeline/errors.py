"""Errors the pipeline raises about its input data."""


class SampleDecodeError(RuntimeError):
    """An image inside a shard (or folder) that cannot be decoded; the message names it."""


def data_error_message(err: BaseException) -> str:
    """The error's own message, also when a DataLoader worker raised it.

    PyTorch raises a worker's exception again in the main process with the worker's whole traceback
    as its message; the line that names the shard and the sample is the last one.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last_line = text.rstrip().splitlines()[-1]
    return last_line.removeprefix(f"{type(err).__module__}.{type(err).__qualname__}: ")
