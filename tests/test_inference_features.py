"""domainfm.inference.extract_features: the one frozen-feature loop (order, flip TTA, ToMe, autocast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from domainfm.backbones import create_backbone
from domainfm.errors import DomainFMError
from domainfm.inference import apply_token_merging, extract_features


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class Samples(Dataset):
    """Dict samples as the plugins' datasets give them: an image plus strings and tuples."""

    def __init__(self, images: torch.Tensor, key: str = "image") -> None:
        self.images, self.key = images, key

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {self.key: self.images[i], "patch_id": f"p{i:02d}", "bands": ("B1", "B2", "B3")}


class FirstColumn(torch.nn.Module):
    """Features = each band's mean over the first pixel column: known by hand for the mirror too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :, 0].mean(dim=-1)


def small_vit(size: int = 28, depth: int = 2):
    """A random DINOv2-style ViT; its LayerScale (1e-5 at init) raised so the blocks do something."""
    torch.manual_seed(0)
    b = create_backbone("vit_small_patch14_dinov2", init="random", img_size=size, depth=depth).eval()
    with torch.no_grad():
        for blk in b.model.blocks:
            blk.ls1.gamma.fill_(0.5)
            blk.ls2.gamma.fill_(0.5)
    return b


def _images(n: int = 5, size: int = 28) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror_by_hand():
    x = _images()
    got = extract_features(FirstColumn(), Samples(x), batch_size=2, flip_tta=True, progress=None)
    # the mirror's first column is the image's last column
    by_hand = (x[:, :, :, 0].numpy().mean(axis=-1) + x[:, :, :, -1].numpy().mean(axis=-1)) / 2
    np.testing.assert_allclose(got, by_hand, rtol=1e-6, atol=1e-7)
    plain = extract_features(FirstColumn(), Samples(x), batch_size=2, progress=None)
    np.testing.assert_allclose(plain, x[:, :, :, 0].numpy().mean(axis=-1), rtol=1e-6, atol=1e-7)


def test_flip_tta_on_a_vit_matches_two_forward_passes():
    b = small_vit()
    x = _images()
    with torch.no_grad():
        a, m = b(x).numpy(), b(torch.flip(x, dims=[-1])).numpy()
    got = extract_features(b, Samples(x), batch_size=3, flip_tta=True, progress=None)
    assert got.shape == (5, b.embed_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, (a + m) / 2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, a, atol=1e-4)  # the mirror changed the features: TTA did something
    # a DataLoader of dicts (another image key) is used as given, in order
    loader = DataLoader(Samples(x, key="crop"), batch_size=4, collate_fn=lambda s: {"crop": torch.stack([d["crop"] for d in s])})
    np.testing.assert_allclose(extract_features(b, loader, image_key="crop", progress=None), a, rtol=1e-5, atol=1e-5)


def test_tome_applied_for_the_call_only_and_train_state_restored():
    b = small_vit(56, 3).train()
    x = _images(4, 56)
    got = extract_features(b, Samples(x), batch_size=4, tome_r=4, progress=None)
    assert b.training  # the caller's state comes back
    b.eval()
    with torch.no_grad():
        plain = b(x).numpy()
        with apply_token_merging(b, 4):
            merged = b(x).numpy()
        after = b(x).numpy()
    np.testing.assert_allclose(got, merged, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-4)
    np.testing.assert_array_equal(after, plain)  # merging was removed after the call


def test_autocast_and_errors():
    b = small_vit()
    x = _images(3)
    ref = extract_features(b, Samples(x), progress=None)
    bf16 = extract_features(b, Samples(x), precision="bf16-mixed", progress=None)
    assert bf16.dtype == np.float32
    cos = (ref * bf16).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99
    with pytest.raises(DomainFMError, match="16-mixed needs a GPU"):
        extract_features(b, Samples(x), precision="16-mixed", progress=None)

    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    with pytest.raises(DomainFMError, match="NaN or infinite features"):
        extract_features(Broken(), Samples(x), progress=None)
