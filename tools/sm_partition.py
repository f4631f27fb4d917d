"""A CUDA stream whose kernels run on only part of the GPU's SMs (a CUDA green context).

`tools.bench_train --model-sms N` runs the training step on such a stream. On the H100, DALI's
decoding kept up alone but not beside the step, whose kernels leave its small per-image kernels no
room (docs/PERFORMANCE.md, 2026-11-27); a step confined to N SMs leaves the rest free for them.
Written on the CUDA driver API (cuda.bindings, installed with PyTorch's CUDA builds) rather than
`torch.cuda.GreenContext`, whose interface differs between the torch 2.11 of the GPU machine and
the 2.14 here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PartialGpuStream:
    stream: torch.cuda.ExternalStream
    num_sms: int  # what the driver granted: at least the SMs asked for, rounded to its granularity
    total_sms: int
    green_context: object  # kept alive as long as the stream


def _checked(call: str, result: tuple):
    from cuda.bindings import driver

    error, *values = result
    if error != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{call} failed: {error.name}")
    return values[0] if len(values) == 1 else values


def partial_gpu_stream(device: torch.device, num_sms: int) -> PartialGpuStream:
    """A stream on `device` whose kernels run on `num_sms` of its SMs (rounded up by the driver).

    Needs CUDA driver 12.4+ and a GPU that splits its SMs (Hopper and later). Kernels of other
    streams, such as DALI's, still run on every SM, and so on the ones this stream leaves free.
    """
    if device.type != "cuda":
        raise ValueError(f"a partial-GPU stream needs a CUDA device, not {device}")
    from cuda.bindings import driver

    torch.cuda.init()
    cu_device = _checked("cuDeviceGet", driver.cuDeviceGet(device.index or 0))
    all_sms = _checked(
        "cuDeviceGetDevResource",
        driver.cuDeviceGetDevResource(cu_device, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
    )
    total = all_sms.sm.smCount
    if not 0 < num_sms < total:
        raise ValueError(f"--model-sms {num_sms}: the GPU has {total} SMs; ask for fewer, and more than 0")
    groups, _, _ = _checked("cuDevSmResourceSplitByCount", driver.cuDevSmResourceSplitByCount(1, all_sms, 0, num_sms))
    descriptor = _checked("cuDevResourceGenerateDesc", driver.cuDevResourceGenerateDesc([groups[0]], 1))
    context = _checked(
        "cuGreenCtxCreate",
        driver.cuGreenCtxCreate(descriptor, cu_device, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
    )
    stream = _checked(
        "cuGreenCtxStreamCreate",
        driver.cuGreenCtxStreamCreate(context, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
    )
    return PartialGpuStream(torch.cuda.ExternalStream(int(stream), device=device), groups[0].sm.smCount, total, context)
