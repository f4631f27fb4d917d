"""How the DALI loaders split each batch among several pipelines, and where each part is decoded.

On an H100, dali-gpu alone decodes about 19,000 images/s, but only about 11,500 beside a
ResNet-18 step (docs/PERFORMANCE.md): each image's decode is a short chain of GPU work that waits
behind the model's kernels. Two ways to feed the step anyway, both by giving each batch to more
than one DALI pipeline:
- `cpu_decode_share`: a share of every batch decoded by a pipeline on the host's CPU cores (which
  a GPU pipeline leaves mostly idle), then copied to the GPU and normalized there;
- `gpu_pipelines`: the rest split among this many GPU pipelines, so that several batches' decode
  stages are in flight at once instead of one.
The parts are joined in order, so a batch holds the same images, crops and flips however it is
split.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class BatchPart:
    """Images `start:stop` of every batch, decoded by one pipeline (on the host if `on_host`)."""

    start: int
    stop: int
    on_host: bool

    @property
    def size(self) -> int:
        return self.stop - self.start


def batch_parts(batch_size: int, cpu_decode_share: float, gpu_pipelines: int) -> list[BatchPart]:
    """The parts of a batch: `gpu_pipelines` near-equal parts, then the host's `cpu_decode_share`.

    With a loader that decodes on the CPU anyway (dali-cpu), every part is decoded there; the split
    still holds, which is how it is tested without a GPU.
    """
    if not 0.0 <= cpu_decode_share < 1.0:
        raise ValueError(f"data.cpu_decode_share must be in [0, 1), got {cpu_decode_share}")
    if gpu_pipelines < 1:
        raise ValueError(f"data.gpu_pipelines must be at least 1, got {gpu_pipelines}")
    on_host = round(batch_size * cpu_decode_share)
    if cpu_decode_share > 0 and on_host == 0:
        raise ValueError(f"data.cpu_decode_share {cpu_decode_share} of a batch of {batch_size} is less than one image")
    on_device = batch_size - on_host
    if on_device < gpu_pipelines:
        raise ValueError(
            f"data.gpu_pipelines {gpu_pipelines}: more pipelines than the {on_device} images of each batch left to them"
        )
    bounds = [on_device * i // gpu_pipelines for i in range(gpu_pipelines + 1)]
    parts = [BatchPart(start, stop, False) for start, stop in pairwise(bounds)]
    if on_host:
        parts.append(BatchPart(on_device, batch_size, True))
    return parts
