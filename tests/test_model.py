"""Models: torchvision's classifiers by name, and the options FFCV's recipes use (BlurPool, test-time flips)."""

import argparse

import pytest
import timm
import torch
import torchvision

from tests.conftest import REPO_ROOT
from train.config import ConfigError, load_config
from train.distributed import DistContext
from train.lamb import Lamb
from train.metrics import evaluate
from train.model import MODEL_NAMES, BatchNormDropPath, BlurPoolConv2d, build_model
from train.trainer import build_optimizer
from train.val_settings import add_val_setting_flags, val_settings

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
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


# One classifier of each torchvision family (the smallest), at a size each accepts.
FAMILIES = [
    ("alexnet", 64), ("convnext_tiny", 64), ("densenet121", 64), ("efficientnet_b0", 64), ("googlenet", 64),
    ("inception_v3", 80), ("maxvit_t", 224), ("mnasnet0_5", 64), ("mobilenet_v3_small", 64), ("regnet_y_400mf", 64),
    ("resnext50_32x4d", 64), ("shufflenet_v2_x0_5", 64), ("squeezenet1_1", 64), ("swin_v2_t", 64), ("vit_b_32", 64),
]  # fmt: skip
# Not stepped here: ResNets (the tests above and the trainer's), and VGG and Wide ResNet, plain
# variants of AlexNet's and ResNeXt's code at 130 and 69 million parameters (slow on two cores).
COVERED_ELSEWHERE = {"resnet", "vgg", "wide"}


def test_the_families_cover_torchvisions_classifiers():
    def family(name: str) -> str:
        return name.split("_")[0].rstrip("0123456789")

    assert {family(name) for name in MODEL_NAMES} == {family(name) for name, _ in FAMILIES} | COVERED_ELSEWHERE


@pytest.mark.parametrize(("name", "size"), FAMILIES)
def test_each_family_trains_a_step_and_scores_every_class(name, size):
    """Plain logits in training too (GoogLeNet and Inception v3 without their auxiliary heads)."""
    torch.manual_seed(0)
    model = build_model(name, 7, image_size=size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 7)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    optimizer.step()
    model.eval()
    assert model(images).shape == (2, 7)


def test_zero_init_residual_is_the_resnet_familys_only():
    last_bn = "layer1.0.bn2.weight"
    assert not build_model("resnet18", 10).state_dict()[last_bn].any()  # unset: zeroed, as before
    assert build_model("resnet18", 10, zero_init_residual=False).state_dict()[last_bn].all()
    assert not build_model("resnext50_32x4d", 10).state_dict()["layer1.0.bn3.weight"].any()
    build_model("mobilenet_v3_small", 10, zero_init_residual=False)
    with pytest.raises(ValueError, match="model.zero_init_residual: mobilenet_v3_small has no such option"):
        build_model("mobilenet_v3_small", 10, zero_init_residual=True)
    with pytest.raises(ConfigError, match="model.zero_init_residual: mobilenet_v3_small has no such option"):
        load_config(DEMO, ["model.name=mobilenet_v3_small", "model.zero_init_residual=true"])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_drop_path_skips_resnet_blocks_as_timms_resnets_do(name):
    """model.drop_path on a ResNet: the rates per block and, given the same weights and random
    numbers, the very outputs of timm's ResNet built with drop_path_rate (in training, where blocks
    are skipped, and in evaluation, where none is); torchvision's state_dict keys unchanged."""
    rate = 0.5  # high enough that many samples skip many blocks in one batch
    ours = build_model(name, 10, drop_path=rate).to(memory_format=torch.contiguous_format)  # as timm's: same sums
    theirs = timm.create_model(name, num_classes=10, drop_path_rate=rate)
    with torch.no_grad():  # both zero each branch's last norm at first, leaving nothing to drop
        for norm in (m for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.weight.uniform_(0.5, 1.5)
    assert ours.state_dict().keys() == build_model(name, 10).state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    blocks = [
        m for m in theirs.modules() if isinstance(m, timm.models.resnet.BasicBlock | timm.models.resnet.Bottleneck)
    ]
    their_rates = [block.drop_path.drop_prob if block.drop_path is not None else 0.0 for block in blocks]
    our_rates = [m.rate for m in ours.modules() if isinstance(m, BatchNormDropPath)]
    assert [0.0, *our_rates] == their_rates and their_rates[-1] == rate
    images = torch.randn(16, 3, 64, 64)
    outputs = {}
    for mode in ("train", "eval"):
        for model_name, model in (("ours", ours), ("theirs", theirs), ("without", build_model(name, 10))):
            if model_name == "without":
                model.load_state_dict(theirs.state_dict())
                model.to(memory_format=torch.contiguous_format)
            torch.manual_seed(0)
            outputs[mode, model_name] = model.train(mode == "train")(images)
    for mode in ("train", "eval"):
        torch.testing.assert_close(outputs[mode, "ours"], outputs[mode, "theirs"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["eval", "ours"], outputs["eval", "without"], rtol=1e-4, atol=1e-5)
    assert (outputs["train", "ours"] - outputs["train", "without"]).abs().max() > 0.1  # blocks were skipped


def test_drop_path_goes_to_the_builders_that_take_it_and_is_refused_elsewhere():
    convnext = build_model("convnext_tiny", 10, drop_path=0.3)
    rates = [m.p for m in convnext.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    assert rates[-1] == pytest.approx(0.3) and rates[0] == 0.0
    assert not any(isinstance(m, BatchNormDropPath) for m in build_model("resnet18", 10).modules())
    assert not any(isinstance(m, BatchNormDropPath) for m in build_model("resnet18", 10, drop_path=0.0).modules())
    with pytest.raises(ValueError, match="model.drop_path: torchvision's vit_b_32 takes no stochastic depth rate"):
        build_model("vit_b_32", 10, image_size=64, drop_path=0.1)
    with pytest.raises(ConfigError, match=r"model.drop_path: must be in \[0, 1\), got 1.0"):
        load_config(DEMO, ["model.drop_path=1.0"])


def test_blurpool_on_other_families_and_a_model_with_nothing_to_blur():
    assert any(isinstance(m, BlurPoolConv2d) for m in build_model("mobilenet_v3_small", 10, blurpool=True).modules())
    with pytest.raises(ValueError, match="model.blurpool: vit_b_32 has no strided convolution"):
        build_model("vit_b_32", 10, blurpool=True, image_size=64)


def test_a_model_built_for_one_size_needs_one_resolution():
    assert load_config(DEMO, ["model.name=vit_b_32"]).model.name == "vit_b_32"  # the demo: 64 px throughout
    with pytest.raises(ConfigError, match="resolution: vit_b_32 is built for one input size.*got 64, 64, 80"):
        load_config(DEMO, ["model.name=vit_b_32", "resolution.val=80"])
    with pytest.raises(ConfigError, match="model.name: 'resnet17' is not one of"):
        load_config(DEMO, ["model.name=resnet17"])


def test_evaluation_keeps_a_fixed_size_model_at_its_size():
    """train.evaluate's and tools.predict's --image-size may change a ResNet's val crop, not a ViT's
    (its position embeddings are built for one size): the error names the model and the checkpoint."""
    vit = {"config": load_config(DEMO, ["model.name=vit_b_32"]).to_dict()}
    resnet = {"config": load_config(DEMO, []).to_dict()}
    flags = argparse.ArgumentParser()
    add_val_setting_flags(flags)
    assert val_settings(flags.parse_args(["--image-size", "64"]), [vit], ["vit.pt"]).image_size == 64  # its own
    assert val_settings(flags.parse_args(["--image-size", "96"]), [resnet], ["resnet.pt"]).image_size == 96
    with pytest.raises(ConfigError, match=r"--image-size 96: vit_b_32 \(vit.pt\) is built for 64 px"):
        val_settings(flags.parse_args(["--image-size", "96"]), [resnet, vit], ["resnet.pt", "vit.pt"])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "rmsprop", "lamb"])
def test_weight_decay_spares_norms_biases_and_transformer_embeddings(optimizer):
    cfg = load_config(DEMO, [f"optim.optimizer={optimizer}", "optim.weight_decay=0.05"])
    for name, spared in [
        ("resnet18", lambda n, p: p.ndim == 1),  # BatchNorm weights and biases, the classifier's bias
        ("vit_b_32", lambda n, p: p.ndim == 1 or n in ("class_token", "encoder.pos_embedding")),
        ("swin_t", lambda n, p: p.ndim == 1 or n.endswith("relative_position_bias_table")),
    ]:
        model = build_model(name, 10, image_size=64)
        groups = build_optimizer(model, cfg, 0.1).param_groups
        assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
        assert {id(p) for p in groups[1]["params"]} == {id(p) for n, p in model.named_parameters() if spared(n, p)}
    plain = load_config(DEMO, [f"optim.optimizer={optimizer}", "optim.no_decay_bn_bias=false"])
    assert len(build_optimizer(build_model("vit_b_32", 10, image_size=64), plain, 0.1).param_groups) == 1
    expected = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop, "lamb": Lamb}[
        optimizer
    ]
    built = build_optimizer(build_model("resnet18", 10), cfg, 0.1)
    assert type(built) is expected
    if optimizer == "rmsprop":  # torchvision's reference script's RMSprop
        assert (built.defaults["alpha"], built.defaults["eps"], built.defaults["momentum"]) == (0.9, 0.0316, 0.9)
