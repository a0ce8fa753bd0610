"""Every backbone names the same five stages; hooks on them fire with the expected shapes; heads are replaceable."""

from __future__ import annotations

import pytest
import torch

from medtransfer.models.backbones import STAGE_NAMES, Classifier, create_backbone, keras_like_init_
from medtransfer.errors import ModelError

# (channels, spatial divisor) of each stage for torchvision/timm ResNets; basic blocks (resnet18) have 1x width.
BOTTLENECK = {"stem": (64, 2), "stage1": (256, 4), "stage2": (512, 8), "stage3": (1024, 16), "stage4": (2048, 32)}
BASIC = {"stem": (64, 2), "stage1": (64, 4), "stage2": (128, 8), "stage3": (256, 16), "stage4": (512, 32)}


def _stage_shapes(model, size):
    shapes = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name, module in model.stage_modules().items()
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(2, 3, size, size))
    for handle in handles:
        handle.remove()
    return shapes


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "keras_resnet50"])
@pytest.mark.parametrize("size", [32, 64, 224])
def test_stage_names_and_shapes(arch, size):
    model = Classifier(arch, num_classes=3)
    shapes = _stage_shapes(model, size)
    assert list(shapes) == list(STAGE_NAMES)
    table = BASIC if arch == "resnet18" else BOTTLENECK
    for name, (channels, divisor) in table.items():
        side = -(-size // divisor)  # ceil: odd sides round up through the strided convolutions
        assert shapes[name] == (2, channels, side, side), (arch, size, name)


def test_head_is_dropout_then_linear_and_replaceable():
    model = Classifier("resnet18", num_classes=2)
    assert isinstance(model.head[0], torch.nn.Dropout) and model.head[0].p == 0.5
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 2)
    model.replace_head(7)
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 7)
    headless = Classifier("resnet18", num_classes=None)
    assert headless(torch.zeros(4, 3, 32, 32)).shape == (4, 512)


def test_keras_like_init_is_seeded_and_not_zero_in_residual_branches():
    first, second, other = (Classifier("resnet18", None) for _ in range(3))
    keras_like_init_(first, torch.Generator().manual_seed(0))
    keras_like_init_(second, torch.Generator().manual_seed(0))
    keras_like_init_(other, torch.Generator().manual_seed(1))
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    conv = "backbone.body.layer1.0.conv1.weight"
    assert not torch.equal(first.state_dict()[conv], other.state_dict()[conv])
    last_bn = first.backbone.body.layer1[0].bn2.weight
    assert torch.all(last_bn == 1.0), "no zero-initialised last BatchNorm"


def test_unknown_architecture():
    with pytest.raises(ModelError, match="timm has no model named 'vgg_sixteen'"):
        create_backbone("vgg_sixteen")


def test_any_other_timm_name_is_a_timm_backbone_and_resnets_take_no_model_args():
    from medtransfer.models.timm_backbone import TimmBackbone

    model = Classifier("vit_tiny_patch16_224", num_classes=2, model_args={"img_size": 32})
    assert isinstance(model.backbone, TimmBackbone) and model.model_args == {"img_size": 32}
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ModelError, match="'resnet18' is built with fixed arguments"):
        create_backbone("resnet18", {"img_size": 32})


@pytest.mark.parametrize("arch", ["convnext_atto", "vit_tiny_patch16_224"])
def test_a_seeded_layernorm_model_is_the_same_twice_and_keras_init_leaves_its_norms_alone(arch):
    from medtransfer.models.backbones import seeded_classifier

    args = {"img_size": 32} if arch.startswith("vit") else {}
    first, second, other = (seeded_classifier(arch, None, seed, args) for seed in (0, 0, 1))
    for model, seed in ((first, 0), (second, 0), (other, 1)):
        keras_like_init_(model, torch.Generator().manual_seed(seed))
    differing = [key for key, tensor in first.state_dict().items() if not torch.equal(tensor, other.state_dict()[key])]
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert differing, "another seed draws other weights"
    norms = [m for m in first.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert torch.isfinite(first.eval()(torch.randn(2, 3, 32, 32))).all()


def test_the_torch_free_name_list_matches_the_factory():
    from medtransfer.models.architectures import ARCHITECTURES
    from medtransfer.models.backbones import BACKBONES

    assert tuple(BACKBONES) == ARCHITECTURES


def test_loading_the_config_does_not_import_torch(tmp_path, repo_root):
    import subprocess
    import sys

    code = ("import sys; from medtransfer.config import load_config; load_config(sys.argv[1]); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(repo_root / "profiles/demo.yaml")],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
