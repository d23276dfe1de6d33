"""The frozen-feature forward pass shared by histo embed (uint8 tiles), eo-sar embed (normalised
windows, pooled or dense) and ``extract_features``: bit-identical to the loop each had written out,
restated here by hand (normalise with the backbone's mean/std x 255, bilinear antialiased resize to
the ViT's size, ``inference_mode``, autocast), on seeded random models and images."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

SMALL = dict(depth=2, num_heads=2, embed_dim=32)


def _vit(img_size: int = 28):
    from domainfm.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit_small_patch14_dinov2", img_size=img_size, init="random", **SMALL).eval()


def _by_hand(backbone, tiles: torch.Tensor, dtype=None) -> np.ndarray:
    """The tile loop as histo embed wrote it: uint8 [B, S, S, 3] -> features."""
    from domainfm.backbones import input_normalization

    mean, std = input_normalization(backbone)
    mean = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(std).view(1, -1, 1, 1) * 255.0
    with torch.inference_mode():
        x = (tiles.permute(0, 3, 1, 2).float() - mean) / std
        if backbone.is_vit and x.shape[-1] != backbone.img_size:
            x = F.interpolate(x, size=(backbone.img_size, backbone.img_size), mode="bilinear", antialias=True)
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            return backbone(x).float().numpy()


@pytest.mark.parametrize("precision,dtype", [("32-true", None), ("bf16-mixed", torch.bfloat16)])
@pytest.mark.parametrize("size", [28, 40])  # 40: resized to the ViT's 28 on the device
def test_tile_encoder_features_are_bit_identical_to_the_loop_by_hand(precision, dtype, size):
    from plugins.histo.embedding import TileEncoder

    backbone = _vit(28)
    g = torch.Generator().manual_seed(1)
    tiles = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8, generator=g)
    enc = TileEncoder(backbone, torch.device("cpu"), precision)
    got = enc(tiles)
    assert got.dtype == np.float32 and got.shape == (3, 32)
    np.testing.assert_array_equal(got, _by_hand(backbone, tiles, dtype))
    # channels first is read the same
    np.testing.assert_array_equal(enc(tiles.permute(0, 3, 1, 2).contiguous()), got)


def test_a_cnn_takes_the_tiles_at_their_own_size():
    from domainfm.backbones import create_backbone
    from plugins.histo.embedding import TileEncoder

    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", img_size=32, init="random").eval()
    tiles = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(TileEncoder(backbone, torch.device("cpu"), "32-true")(tiles),
                                  _by_hand(backbone, tiles))


@pytest.mark.parametrize("dense", [False, True])
def test_window_encoder_features_are_bit_identical_to_the_loop_by_hand(dense):
    from plugins.eo_sar.scene_embedding import WindowEncoder

    backbone = _vit(28)
    windows = np.random.default_rng(3).standard_normal((2, 3, 28, 28)).astype(np.float32)
    enc = WindowEncoder(backbone, torch.device("cpu"), "bf16-mixed", dense=dense, crop=0, k=1 if not dense else 2)
    got = enc(windows)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.from_numpy(windows)
        if dense:
            m = backbone.model
            tokens = m.forward_features(x)[:, m.num_prefix_tokens:]
            g = int(math.isqrt(tokens.shape[1]))
            want = tokens.reshape(2, g, g, -1)[:, 0:2, 0:2].float().numpy()
        else:
            want = backbone(x).float().numpy()
    assert got.shape == ((2, 2, 2, 32) if dense else (2, 32))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("flip_tta", [False, True])
def test_extract_features_is_bit_identical_to_the_loop_by_hand(flip_tta):
    from domainfm.inference import extract_features

    backbone = _vit(28)
    images = torch.from_numpy(np.random.default_rng(4).standard_normal((5, 3, 28, 28)).astype(np.float32))
    got = extract_features(backbone, [{"image": im} for im in images], precision="bf16-mixed", flip_tta=flip_tta,
                           batch_size=2, progress=None)
    want = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, 5, 2):
            x = images[start:start + 2]
            f = backbone(x).float()
            if flip_tta:
                f = (f + backbone(torch.flip(x, dims=[-1])).float()) / 2
            want.append(f)
    np.testing.assert_array_equal(got, torch.cat(want).numpy())
