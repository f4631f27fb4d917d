"""The model options FFCV's recipes use: BlurPool, and test-time flips in evaluation."""

import pytest
import torch

from train.distributed import DistContext
from train.metrics import evaluate
from train.model import BlurPoolConv2d, build_model

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("name", "wrapped"),
    [
        ("resnet18", ["layer2.0.conv1", "layer2.0.downsample.0", "layer3.0.conv1", "layer3.0.downsample.0",
                      "layer4.0.conv1", "layer4.0.downsample.0"]),
        # torchvision's ResNet-50 (v1.5) strides its 3x3 convolution, not the first 1x1
        ("resnet50", ["layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
                      "layer4.0.conv2", "layer4.0.downsample.0"]),
    ],
)  # fmt: skip
def test_blurpool_wraps_each_strided_convolution_but_the_stem(name, wrapped):
    model = build_model(name, 10, blurpool=True)
    assert [n for n, m in model.named_modules() if isinstance(m, BlurPoolConv2d)] == wrapped
    plain = build_model(name, 10)
    # Same parameters under longer names; the blur kernel is a constant, not saved.
    assert {k.replace(".conv.", ".") for k in model.state_dict()} == set(plain.state_dict())
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_blurpool_is_a_binomial_blur_then_the_convolution():
    conv = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 12, 12)
    # The same blur as two passes of [1, 2, 1] / 4, one along each axis, on a zero-padded input.
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    rows = (padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]) / 4
    blurred = (rows[..., :-2] + 2 * rows[..., 1:-1] + rows[..., 2:]) / 4
    torch.testing.assert_close(BlurPoolConv2d(conv)(x), conv(blurred))


def test_flip_scores_an_image_and_its_mirror_alike():
    """With flips, a val set and its mirror image score identically (the mean of the logits of an
    image and of its mirror is the same for both); without, a random model tells them apart."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    mirrored = [(images.flip(3), labels) for images, labels in batches]
    assert evaluate(model, batches, CPU, "float32", flip=True) == evaluate(model, mirrored, CPU, "float32", flip=True)
    assert evaluate(model, batches, CPU, "float32")["loss"] != evaluate(model, mirrored, CPU, "float32")["loss"]
