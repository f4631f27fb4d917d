"""Models by name from torchvision, laid out for fast training."""

from __future__ import annotations

import torch
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import stochastic_depth

MODEL_NAMES = tuple(models.list_models(module=models))  # torchvision's ImageNet classifiers, by name
RESNET_FAMILY = tuple(n for n in MODEL_NAMES if n.startswith(("resnet", "resnext", "wide_resnet")))
AUX_LOGIT_MODELS = ("googlenet", "inception_v3")  # trained here without their auxiliary classifiers
# Models built for one input size (their position embeddings or attention partitions), and the
# keyword torchvision takes it by.
FIXED_SIZE_KEYWORDS = {**{n: "image_size" for n in MODEL_NAMES if n.startswith("vit_")}, "maxvit_t": "input_size"}
# Models whose torchvision builder takes a stochastic depth rate (`stochastic_depth_prob`, the rate of
# the last block, rising linearly from 0 over the blocks before it). Swin's and MaxViT's builders fix
# their own and refuse another.
STOCHASTIC_DEPTH_BUILDERS = tuple(n for n in MODEL_NAMES if n.startswith(("convnext_", "efficientnet_")))


def build_model(
    name: str,
    num_classes: int,
    zero_init_residual: bool | None = None,
    blurpool: bool = False,
    image_size: int | None = None,
    drop_path: float | None = None,
) -> torch.nn.Module:
    """A randomly initialised torchvision classifier in channels_last memory format.

    `zero_init_residual` zeroes the last BatchNorm of each residual block of the ResNet family, so
    every block starts as the identity (Goyal et al., 2017); None means yes for that family, which
    alone has the option. `blurpool` blurs the input of each strided convolution (`add_blurpool`).
    `image_size` is the input size of the models built for one (`FIXED_SIZE_KEYWORDS`).
    `drop_path`: stochastic depth at this rate in the last block (`add_drop_path` for the ResNet
    family, the builder's own for `STOCHASTIC_DEPTH_BUILDERS`); None leaves the builder's default.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name: {name!r} is not one of torchvision's classifiers {list(MODEL_NAMES)}")
    options: dict = {}
    if name in RESNET_FAMILY:
        options["zero_init_residual"] = zero_init_residual is not False
    elif zero_init_residual:
        raise ValueError(
            f"model.zero_init_residual: {name} has no such option (the ResNet family only: resnet*, resnext*, "
            "wide_resnet*); leave it unset or false"
        )
    options.update(architecture_options(name, image_size))
    if drop_path is not None and name in STOCHASTIC_DEPTH_BUILDERS:
        options["stochastic_depth_prob"] = drop_path
    elif drop_path is not None and name not in RESNET_FAMILY:
        raise ValueError(
            f"model.drop_path: torchvision's {name} takes no stochastic depth rate; offered for the ResNet family "
            "(resnet*, resnext*, wide_resnet*), convnext_* and efficientnet_*; leave it unset"
        )
    model = models.get_model(name, weights=None, num_classes=num_classes, **options)
    if drop_path and name in RESNET_FAMILY:
        add_drop_path(model, drop_path)
    if blurpool and not add_blurpool(model):
        raise ValueError(f"model.blurpool: {name} has no strided convolution of 16 or more input channels to blur")
    return model.to(memory_format=torch.channels_last)


def architecture_options(name: str, image_size: int | None = None) -> dict:
    """The keywords of `torchvision.models.get_model` besides num_classes that build the model as
    trained here: without auxiliary classifiers, and fixed-size models at their input size."""
    options: dict = {}
    if name in AUX_LOGIT_MODELS:
        options.update(aux_logits=False, init_weights=True)
    if name in FIXED_SIZE_KEYWORDS:
        if image_size is None:
            raise ValueError(f"{name} is built for one input size: give image_size")
        keyword = FIXED_SIZE_KEYWORDS[name]
        options[keyword] = (image_size, image_size) if keyword == "input_size" else image_size
    return options


class BatchNormDropPath(torch.nn.BatchNorm2d):
    """A residual branch's last BatchNorm followed by stochastic depth (Huang et al., 2016): in
    training, each sample's branch is zeroed with probability `rate` and kept ones are scaled by
    1 / (1 - rate), so the block passes a dropped sample's input through alone.

    torchvision's ResNet blocks have no place for it, and timm's ResNets put it right after this
    norm, before the shortcut is added: taking the norm's place puts it there while the state_dict
    stays torchvision's (the exported weights load into its builders as they are).
    """

    def __init__(self, norm: torch.nn.BatchNorm2d, rate: float):
        super().__init__(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        self.load_state_dict(norm.state_dict())
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(super().forward(x), self.rate, "row", self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, drop_path={self.rate:.4g}"


def add_drop_path(model: torch.nn.Module, rate: float) -> None:
    """Stochastic depth in a ResNet's blocks as timm's ResNets apply it (`drop_path_rate`): block i
    of n drops at rate * i / (n - 1), from none in the first to `rate` in the last."""
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    rates = [rate * i / max(len(blocks) - 1, 1) for i in range(len(blocks))]
    for block, block_rate in zip(blocks, rates, strict=True):
        if block_rate > 0:
            last = "bn3" if isinstance(block, Bottleneck) else "bn2"
            setattr(block, last, BatchNormDropPath(getattr(block, last), block_rate))


class BlurPoolConv2d(torch.nn.Module):
    """A convolution whose input first goes through a fixed 3x3 binomial blur, channel by channel.

    Anti-aliasing before downsampling (Zhang, "Making convolutional networks shift-invariant again",
    2019), as FFCV's ResNet recipes use it. Written here because torchvision has no such layer and
    these few lines do not justify a dependency on timm.
    """

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        # Not persistent: a constant, so checkpoints hold only what training changes.
        self.register_buffer("blur_kernel", kernel.expand(conv.in_channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = torch.nn.functional.conv2d(x, self.blur_kernel, padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def add_blurpool(module: torch.nn.Module) -> int:
    """Wrap every convolution with a stride above 1 and at least 16 input channels in a blur
    (FFCV's rule: the stem's 3-channel convolution is left as it is); returns how many."""
    wrapped = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
            wrapped += 1
        else:
            wrapped += add_blurpool(child)
    return wrapped
