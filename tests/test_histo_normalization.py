"""One input normalisation per backbone, used by histo pretraining and histo embed (issue 9, item 9).

Pretraining used ImageNet's mean/std while embedding used the backbone's own; for a CLIP backbone
they differ, so a model was pretrained and applied under different inputs. Both now ask the core
(domainfm.backbones.input_normalization). The expected values are OpenAI CLIP's published
statistics, written here by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_make_data
from domainfm.backbones import input_normalization
from domainfm.config import RunConfig
from plugins.histo import plugin
from plugins.histo.embedding import EmbedSettings, TileEncoder, build_encoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP = "vit_base_patch16_clip_224"
SMALL = dict(depth=1, embed_dim=64, num_heads=2)  # a random-init CLIP ViT small enough for CPU tests


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("norm_slides")
    load_make_data("histo").write_generic_tiff(root / "b20x.tif")
    return root


def pretrain_normalization(slide_dir, backbone):
    cfg = RunConfig(plugin="histo", data=str(slide_dir), backbone=backbone, init="random", img_size=28,
                    batch_size=2, options={"mpp": 1.0, "tile_size": 48, "tiles_per_epoch": 2})
    dm = plugin.pretrain_datamodule(cfg)
    dm.setup("fit")
    from torchvision.transforms import v2

    norm = [t for t in dm.dataset.views.transform.transforms if isinstance(t, v2.Normalize)]
    assert len(norm) == 1
    return tuple(norm[0].mean), tuple(norm[0].std)


def embed_normalization(backbone, **kwargs):
    s = EmbedSettings(out_dir="unused", backbone=backbone, init="random", tile_size=32, model_kwargs=kwargs)
    enc = TileEncoder(build_encoder(s), torch.device("cpu"), "32-true")
    return enc, tuple((enc.mean / 255).flatten().tolist()), tuple((enc.std / 255).flatten().tolist())


def test_clip_backbone_pretrain_and_embed_use_clips_statistics(slide_dir):
    p_mean, p_std = pretrain_normalization(slide_dir, CLIP)
    enc, e_mean, e_std = embed_normalization(CLIP, **SMALL)
    np.testing.assert_allclose(p_mean, CLIP_MEAN, rtol=1e-6)
    np.testing.assert_allclose(p_std, CLIP_STD, rtol=1e-6)
    np.testing.assert_allclose(e_mean, CLIP_MEAN, rtol=1e-6)
    np.testing.assert_allclose(e_std, CLIP_STD, rtol=1e-6)
    assert input_normalization(CLIP) == input_normalization(enc.backbone) == enc.backbone.normalization
    # the embed path really applies it: a uniform tile through the encoder equals a forward pass on
    # the tile normalised by hand with CLIP's statistics
    tile = torch.full((1, 32, 32, 3), 200, dtype=torch.uint8)
    x = (torch.full((1, 3, 32, 32), 200 / 255.0) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = enc.backbone(x).numpy()
    np.testing.assert_allclose(enc(tile), ref, rtol=1e-4, atol=1e-5)


def test_each_backbone_has_its_own(slide_dir):
    """A backbone with other statistics (timm's test_resnet: 0.5, 0.5) gets those, on both paths."""
    p_mean, p_std = pretrain_normalization(slide_dir, "test_resnet")
    _, e_mean, e_std = embed_normalization("test_resnet")
    assert p_mean == e_mean == (0.5, 0.5, 0.5) and p_std == e_std == (0.5, 0.5, 0.5)
    assert input_normalization("vit_small_patch14_dinov2") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
