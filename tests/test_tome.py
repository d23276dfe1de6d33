"""Token merging (ToMe) on timm ViT blocks: r=0 is bit-identical, token counts fall as the schedule
says, merged duplicates reproduce the unmerged block exactly (proportional attention), CLS and
register tokens are never merged, pooled features stay close, and the CLI refuses bad --tome-r."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from conftest import load_make_data, run_cli
from domainfm.backbones import create_backbone, save_backbone
from domainfm.inference import (apply_token_merging, bipartite_soft_matching, merge_weighted,
                                merged_token_counts)

ARCHS = [("vit_small_patch14_dinov2", 56), ("vit_small_patch14_reg4_dinov2", 56), ("vit_base_patch16_clip_224", 64)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def small_vit(name: str, size: int, *, depth: int = 4, layer_scale: float | None = 0.5):
    """A random ViT of the named architecture; DINOv2's LayerScale starts at 1e-5, which would make
    every block almost the identity, so it is raised to a trained model's order of magnitude."""
    torch.manual_seed(0)
    b = create_backbone(name, init="random", img_size=size, depth=depth).eval()
    if layer_scale is not None:
        with torch.no_grad():
            for blk in b.model.blocks:
                for ls in (blk.ls1, blk.ls2):
                    if hasattr(ls, "gamma"):
                        ls.gamma.fill_(layer_scale)
    return b


def images(size: int, n: int = 3) -> torch.Tensor:
    """Smooth images (neighbouring patches alike, as in tissue or a field), not white noise."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name,size", ARCHS)
def test_r0_is_bit_identical_and_removal_restores(name, size):
    b = small_vit(name, size)
    x = images(size)
    with torch.no_grad():
        ref = b(x)
        with apply_token_merging(b, 0) as h:
            assert torch.equal(b(x), ref)
            assert h.token_counts == [b.num_patches + b.model.num_prefix_tokens] * len(b.model.blocks)
        with apply_token_merging(b, 3):
            assert not torch.equal(b(x), ref)
        assert torch.equal(b(x), ref)  # the handle undid the patch
        assert all("forward" not in blk.__dict__ for blk in b.model.blocks)


@pytest.mark.parametrize("name,size", ARCHS)
def test_token_counts_follow_the_schedule(name, size):
    b = small_vit(name, size, depth=6)
    P = b.model.num_prefix_tokens
    for r in (1, 4, 8):
        with apply_token_merging(b, r) as h, torch.no_grad():
            b(images(size, 2))
            expected = merged_token_counts(b.num_patches, r, 6)[1:]
            assert h.token_counts == [P + n for n in expected]


def test_schedule_by_hand():
    # 16 patches, r=5: 16 -> 11 -> 6 -> 3 (half of 6) -> 2 (half of 3 is 1) -> 1
    assert merged_token_counts(16, 5, 5) == [16, 11, 6, 3, 2, 1]


def test_matching_by_hand():
    # protected token 0; A = rows 1, 3; B = rows 2, 4. Row 1 is parallel to row 4 (cos 1), row 3
    # at 45 degrees to row 2: with r=1 only 1 -> 4 merges.
    metric = torch.tensor([[[9., 9.], [1., 0.], [1., 1.], [0., 1.], [2., 0.]]])
    x = torch.tensor([[[100.], [1.], [2.], [3.], [5.]]])
    size = torch.ones(1, 5, 1)
    merge = bipartite_soft_matching(metric, 1, num_protected=1)
    out, new_size = merge_weighted(merge, x, size)
    # [protected, unmerged A (row 3), B (row 2, row 4 + row 1 averaged)]
    assert out.flatten().tolist() == [100., 3., 2., 3.]
    assert new_size.flatten().tolist() == [1., 1., 1., 2.]
    # sizes weigh the average: row 1 (value 6, size 2) joins row 2 (value 3, size 1) -> (12 + 3) / 3
    metric2 = torch.tensor([[[9., 9.], [1., 0.], [1., 0.1], [0., 1.]]])
    out2, size2 = merge_weighted(bipartite_soft_matching(metric2, 1, 1), torch.tensor([[[100.], [6.], [3.], [0.]]]),
                                 torch.tensor([[[1.], [2.], [1.], [1.]]]))
    assert out2.flatten().tolist() == [100., 0., 5.] and size2.flatten().tolist() == [1., 1., 3.]


@pytest.mark.parametrize("name,size", ARCHS)
def test_merging_duplicates_reproduces_the_unmerged_block(name, size):
    """Two identical tokens merged into one of size 2 with log(2) added to its attention logit give
    the block exactly the same outputs: what proportional attention is for."""
    b = small_vit(name, size)
    blk = b.model.blocks[1]
    P = b.model.num_prefix_tokens
    D = b.embed_dim
    g = torch.Generator().manual_seed(3)
    prefix = torch.randn(2, P, D, generator=g)
    uniq = torch.randn(2, 6, D, generator=g)
    tokens = torch.cat([prefix, uniq.repeat_interleave(2, dim=1)], dim=1)  # a0 a0 a1 a1 ...
    with torch.no_grad():
        ref = blk(tokens)
        with apply_token_merging(b, 6) as h:
            # through the whole stack the first block resets the sizes; call the second block after a
            # forward of the first with sizes of one
            h.state.size = torch.ones(2, tokens.shape[1], 1)
            out = blk(tokens)
    assert out.shape == (2, P + 6, D)
    torch.testing.assert_close(out[:, :P], ref[:, :P], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, P:], ref[:, P + 1::2], rtol=1e-4, atol=1e-4)
    # and the next block sees sizes of 2 for the merged tokens, 1 for CLS/registers
    assert h.state.size[:, :P].eq(1).all() and h.state.size[:, P:].eq(2).all()


@pytest.mark.parametrize("name,size", ARCHS)
def test_prefix_tokens_never_merged_and_sizes_add_up(name, size):
    b = small_vit(name, size)
    P = b.model.num_prefix_tokens
    with apply_token_merging(b, 5) as h, torch.no_grad():
        b(images(size))
        sizes = h.state.size
    assert sizes.shape[1] == P + merged_token_counts(b.num_patches, 5, 4)[-1]
    assert sizes[:, :P].eq(1).all()                                  # CLS (+ registers) alone
    assert torch.equal(sizes[:, P:].sum(dim=1), torch.full((3, 1), float(b.num_patches)))  # every patch counted once


@pytest.mark.parametrize("name,size,r,bound", [("vit_small_patch14_dinov2", 56, 2, 0.98),
                                               ("vit_small_patch14_reg4_dinov2", 56, 2, 0.98),
                                               ("vit_base_patch16_clip_224", 64, 2, 0.98)])
def test_pooled_features_stay_close_for_small_r(name, size, r, bound):
    b = small_vit(name, size)
    x = images(size, 4)
    with torch.no_grad():
        ref = b(x)
        with apply_token_merging(b, r):
            merged = b(x)
        with apply_token_merging(b, b.num_patches // 5):
            heavy = b(x)
    cos = torch.nn.functional.cosine_similarity(merged, ref)
    assert cos.min() > bound, cos
    # merging more tokens moves the features further
    assert torch.nn.functional.cosine_similarity(heavy, ref).mean() < cos.mean()


def test_autocast_bf16_runs_and_stays_close():
    b = small_vit("vit_small_patch14_dinov2", 56)
    x = images(56)
    with torch.no_grad():
        ref = b(x)
        with apply_token_merging(b, 2), torch.autocast("cpu", dtype=torch.bfloat16):
            out = b(x).float()
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.95


def test_library_errors():
    from domainfm.errors import DomainFMError

    cnn = create_backbone("test_resnet", init="random", img_size=32)
    with pytest.raises(DomainFMError, match="token merging needs a ViT"):
        apply_token_merging(cnn, 2)
    vit = small_vit("vit_small_patch14_dinov2", 56)  # 16 patches
    with pytest.raises(DomainFMError, match="--tome-r 9 is too large.*16 patch tokens"):
        apply_token_merging(vit, 9)
    apply_token_merging(vit, 8).remove()  # half of them is allowed


# ---------------------------------------------------------------------------------------------
# the CLI: one line, exit 2, nothing written

@pytest.fixture(scope="module")
def plain_slide(tmp_path_factory):
    return load_make_data("histo").write_plain_image(tmp_path_factory.mktemp("tome_slide") / "s1.png")


def _embed(args):
    from plugins.histo.commands import embed_command

    return CliRunner().invoke(embed_command, [str(a) for a in args])


def test_histo_embed_refuses_tome_on_a_cnn(plain_slide, tmp_path):
    res = _embed([plain_slide, "--out", tmp_path / "out", "--backbone", "test_resnet", "--init", "random",
                  "--tile-size", "32", "--mpp", "2", "--tome-r", "2", "--num-workers", "0"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines == ["error: token merging needs a ViT, and the model is not one (ResNet). "
                     "Fix: drop --tome-r, or use a ViT backbone (DINOv2, CLIP)."]
    assert not (tmp_path / "out" / "features").exists()


def test_histo_embed_refuses_too_large_r(plain_slide, tmp_path):
    # 28 px tiles, 14 px patches: 4 patch tokens, at most 2 merged in a block
    res = _embed([plain_slide, "--out", tmp_path / "out", "--backbone", "vit_small_patch14_dinov2", "--init",
                  "random", "--tile-size", "28", "--mpp", "2", "--tome-r", "3", "--num-workers", "0"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "error: --tome-r 3 is too large for the model: it has 4 patch tokens, and a block can merge at most "
        "half of them (2). Fix: pass --tome-r 2 or less: the largest useful --tome-r for this model's 4 patch "
        "tokens and 12 blocks is 2."]
    assert not (tmp_path / "out" / "features").exists()


@pytest.mark.timeout(300)
def test_eo_sar_evaluate_refuses_tome_on_a_cnn(tmp_path, mlflow_store):
    model = save_backbone(create_backbone("test_resnet", in_chans=13, img_size=32, init="random"),
                          tmp_path / "cnn.safetensors")
    r = run_cli(["evaluate", "--plugin", "eo-sar", "--model", str(model), "--tome-r", "2"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert err == ["error: token merging needs a ViT, and the model is not one (ResNet). "
                   "Fix: drop --tome-r, or use a ViT backbone (DINOv2, CLIP)."]
    assert "Traceback" not in r.stderr
    db = tmp_path / "mlflow.db"  # refused in the plugin's check, before any MLflow run was opened
    if db.exists():
        import sqlite3

        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from runs").fetchone()[0] == 0


def test_histo_embed_with_tome_writes_merged_features(plain_slide, tmp_path):
    import h5py

    common = [plain_slide, "--backbone", "test_vit", "--init", "random", "--tile-size", "64", "--mpp", "0.5",
              "--slide-mpp", "0.5", "--max-tiles", "6", "--min-tissue", "0.1", "--num-workers", "0", "--batch-size", "4"]
    res = _embed([*common, "--out", tmp_path / "plain"])
    assert res.exit_code == 0, res.output
    res = _embed([*common, "--out", tmp_path / "tome", "--tome-r", "4"])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "plain" / "features" / "s1.h5") as f:
        plain = f["features"][:]
    with h5py.File(tmp_path / "tome" / "features" / "s1.h5") as f:
        merged, attrs = f["features"][:], dict(f.attrs)
    assert attrs["tome_r"] == 4 and merged.shape == plain.shape and len(plain) > 0
    # same encoder (seeded), 16 patch tokens merged 4 per block: close but not equal features
    cos = (merged * plain).sum(1) / ((merged ** 2).sum(1) ** 0.5 * (plain ** 2).sum(1) ** 0.5)
    assert not (merged == plain).all() and cos.min() > 0.5
