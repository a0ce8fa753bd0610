"""Any timm model as a backbone: its stages from timm's feature_info, hooked as NCHW grids, matched by reduction."""

from __future__ import annotations

import pytest
import torch

from medtransfer.analysis.similarity import compute_similarity
from medtransfer.errors import ModelError
from medtransfer.models.backbones import STAGE_NAMES
from medtransfer.analysis.stage_matching import match_stages_by_reduction
from medtransfer.models.backbones import Classifier, stage_reductions
from medtransfer.models.timm_backbone import TimmBackbone

IMAGE = 32


def _hooked(backbone, x):
    seen = {}
    handles = [module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach()))
               for name, module in backbone.stage_modules().items()]
    try:
        with torch.no_grad():
            output = backbone.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return output, seen


def test_convnext_stages_fire_with_their_channels_and_reductions():
    torch.manual_seed(0)
    backbone = TimmBackbone("convnext_atto")
    output, seen = _hooked(backbone, torch.randn(2, 3, IMAGE, IMAGE))
    assert list(seen) == ["stages.0", "stages.1", "stages.2", "stages.3"]
    # timm's published convnext_atto widths, halving resolution per stage from a 4x4 patchify stem
    expected = {"stages.0": (40, 4), "stages.1": (80, 8), "stages.2": (160, 16), "stages.3": (320, 32)}
    for name, (channels, reduction) in expected.items():
        side = IMAGE // reduction
        assert tuple(seen[name].shape) == (2, channels, side, side), name
        assert backbone.stage_reductions[name] == reduction
    assert tuple(output.shape) == (2, 320, 1, 1)


def test_vit_blocks_fire_as_patch_grids_without_the_class_token():
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", {"img_size": IMAGE})
    x = torch.randn(2, 3, IMAGE, IMAGE)
    # The oracle: hooks on the transformer blocks themselves, which see (batch, 1 + patches, width) tokens.
    raw = {}
    handles = [block.register_forward_hook(lambda _m, _i, out, k=k: raw.__setitem__(k, out.detach()))
               for k, block in enumerate(backbone.body.blocks)]
    _, seen = _hooked(backbone, x)
    for handle in handles:
        handle.remove()
    assert list(seen) == [f"blocks.{k}" for k in range(12)]
    prefix = backbone.body.num_prefix_tokens
    assert prefix == 1
    grid = IMAGE // 16
    for k in range(12):
        tap = seen[f"blocks.{k}"]
        assert tuple(tap.shape) == (2, 192, grid, grid)
        patches = raw[k][:, prefix:, :]  # class token dropped; patches in row-major order
        torch.testing.assert_close(tap.flatten(2).transpose(1, 2), patches, rtol=0, atol=0)


@pytest.mark.parametrize("name, args", [("convnext_atto", {}), ("vit_tiny_patch16_224", {"img_size": IMAGE})])
def test_pooled_output_is_timms_own_forward(name, args):
    torch.manual_seed(0)
    backbone = TimmBackbone(name, args).eval()
    x = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = backbone.body(x)  # timm's forward with num_classes=0: its pooled pre-logits features
        ours = backbone(x)
    torch.testing.assert_close(ours[:, :, 0, 0], expected, rtol=1e-5, atol=1e-6)


def test_a_stage_compared_with_itself_is_one():
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", {"img_size": IMAGE})
    _, seen = _hooked(backbone, torch.randn(40, 3, IMAGE, IMAGE))
    for name in ("blocks.0", "blocks.11"):
        rows = seen[name].permute(0, 2, 3, 1).reshape(-1, 192).double().numpy()  # positions are datapoints
        result = compute_similarity(rows, rows.copy(), ["cka"])
        assert result.value("cka") == pytest.approx(1.0, abs=1e-9), name


@pytest.mark.parametrize("arch", ["resnet18", "keras_resnet50"])
def test_resnet_stage_reductions_agree_with_timm_and_with_the_maps(arch):
    import timm

    declared = stage_reductions(Classifier(arch, None))
    # oracle 1: timm's own feature_info of its resnet18 (act1, layer1 ... layer4)
    assert list(declared.values()) == [int(e["reduction"]) for e in timm.create_model("resnet18").feature_info]
    # oracle 2: input size over map size at 64 px
    model = Classifier(arch, None).eval()
    _, seen = _hooked(model.backbone, torch.zeros(1, 3, 64, 64))
    assert declared == {name: 64 // seen[name].shape[-1] for name in STAGE_NAMES}


def test_resnet_and_convnext_stages_pair_by_reduction():
    resnet = stage_reductions(Classifier("resnet18", None))
    convnext = TimmBackbone("convnext_atto").stage_reductions
    match = match_stages_by_reduction(resnet, convnext)
    assert match.pairs == (("stage1", "stages.0", 4), ("stage2", "stages.1", 8), ("stage3", "stages.2", 16),
                           ("stage4", "stages.3", 32))
    assert match.unmatched_a == ("stem",) and match.unmatched_b == ()


def test_many_stages_at_one_reduction_pair_the_deepest():
    vit = {f"blocks.{k}": 16 for k in range(12)}
    resnet = dict(zip(STAGE_NAMES, (2, 4, 8, 16, 32)))
    match = match_stages_by_reduction(resnet, vit)
    assert match.pairs == (("stage3", "blocks.11", 16),)
    assert match.unmatched_a == ("stem", "stage1", "stage2", "stage4")
    assert match.unmatched_b == tuple(f"blocks.{k}" for k in range(11))


def test_an_unknown_timm_name_is_one_line_with_close_matches():
    with pytest.raises(ModelError) as info:
        TimmBackbone("convnext_attoo")
    message = str(info.value)
    assert "\n" not in message and "convnext_atto" in message and "did you mean" in message


def test_bad_model_arguments_are_one_line():
    with pytest.raises(ModelError) as info:
        TimmBackbone("vit_tiny_patch16_224", {"img_sise": IMAGE})
    assert "\n" not in str(info.value) and "img_sise" in str(info.value)
