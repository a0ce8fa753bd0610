"""Preprocessing specs: caffe (BGR minus ImageNet BGR means) and ImageNet mean/std, grey replicated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.errors import ModelError
from medtransfer.models.preprocessing import CAFFE, IMAGENET, Preprocessing


def test_caffe_flips_to_bgr_and_subtracts_means_without_scaling():
    image = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # R, G, B
    out = CAFFE.apply(image)
    assert out.shape == (1, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([30 - 103.939, 20 - 116.779, 10 - 123.68]))


def test_imagenet_mean_std_on_unit_scale():
    image = np.full((1, 1, 1, 3), 255, dtype=np.uint8)
    out = IMAGENET.apply(image)[0, :, 0, 0]
    expected = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    torch.testing.assert_close(out, expected)


def test_grey_is_replicated_to_three_channels():
    grey = np.arange(4, dtype=np.uint8).reshape(1, 2, 2)
    out = CAFFE.apply(grey)
    for channel, mean in enumerate((103.939, 116.779, 123.68)):
        torch.testing.assert_close(out[0, channel] + mean, torch.tensor([[0.0, 1.0], [2.0, 3.0]]))


def test_round_trip_and_malformed_specs():
    assert Preprocessing.from_dict(CAFFE.to_dict()) == CAFFE
    with pytest.raises(ModelError, match="malformed preprocessing spec"):
        Preprocessing.from_dict({"name": "x"})
    with pytest.raises(ModelError, match="images must be"):
        CAFFE.apply(np.zeros((2, 2), dtype=np.uint8))
