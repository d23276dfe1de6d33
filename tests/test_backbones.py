"""create_backbone: DINOv2 weights into any band count and size; every other weight unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from domainfm.backbones import adapt_patch_embed_weight, create_backbone, read_state_dict, save_backbone
from domainfm.errors import DomainFMError

NAME = "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def dinov2_518():
    """A random 3-band, 518-px model of the DINOv2 architecture, saved as timm would ship it."""
    torch.manual_seed(0)
    return timm.create_model(NAME, num_classes=0, depth=2)


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_loads_518_rgb_into_13_band_224(tmp_path, dinov2_518):
    path = _save(dinov2_518, tmp_path / "w.safetensors")
    b = create_backbone(NAME, in_chans=13, img_size=224, init=str(path), depth=2)
    src, dst = dinov2_518.state_dict(), b.model.state_dict()
    assert dst["patch_embed.proj.weight"].shape == (384, 13, 14, 14)
    assert dst["pos_embed"].shape == (1, 1 + 16 * 16, 384)
    # the CLS entry of the position embedding is kept, the grid is resized
    assert torch.equal(dst["pos_embed"][:, 0], src["pos_embed"][:, 0])
    for k in src:
        if k not in ("patch_embed.proj.weight", "pos_embed"):
            assert torch.equal(src[k], dst[k]), k
    assert b.embed_dim == 384 and b(torch.rand(2, 13, 224, 224)).shape == (2, 384)


@pytest.mark.parametrize("in_chans", [2, 12, 13])
@pytest.mark.parametrize("mode", ["repeat", "mean"])
def test_grey_input_gives_the_rgb_response(in_chans, mode):
    w = torch.randn(8, 3, 14, 14)
    new = adapt_patch_embed_weight(w, in_chans, mode)
    assert new.shape == (8, in_chans, 14, 14)
    grey = torch.rand(1, 1, 28, 28)
    rgb = F.conv2d(grey.expand(1, 3, 28, 28), w, stride=14)
    multi = F.conv2d(grey.expand(1, in_chans, 28, 28), new, stride=14)
    torch.testing.assert_close(multi, rgb, atol=1e-4, rtol=1e-4)


def test_repeat_is_plain_tiling_for_multiples_of_three():
    w = torch.randn(4, 3, 2, 2)
    new = adapt_patch_embed_weight(w, 6, "repeat")
    torch.testing.assert_close(new, torch.cat([w, w], 1) * 0.5)


def test_random_patch_embed_is_fresh(tmp_path, dinov2_518):
    path = _save(dinov2_518, tmp_path / "w.safetensors")
    b = create_backbone(NAME, in_chans=2, img_size=56, init=str(path), patch_embed_init="random", depth=2)
    w = b.model.patch_embed.proj.weight
    assert w.shape[1] == 2 and not torch.allclose(w, adapt_patch_embed_weight(dinov2_518.patch_embed.proj.weight, 2))
    assert torch.equal(b.model.blocks[1].mlp.fc2.weight, dinov2_518.blocks[1].mlp.fc2.weight)


def test_official_dinov2_keys_and_pth(tmp_path, dinov2_518):
    # the official checkpoint has a mask_token; .pth files load with weights_only=True
    sd = dict(dinov2_518.state_dict())
    sd["mask_token"] = torch.zeros(1, 384)
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    b = create_backbone(NAME, in_chans=3, img_size=98, init=str(tmp_path / "dinov2_vits14_pretrain.pth"), depth=2)
    assert torch.equal(b.model.blocks[0].attn.qkv.weight, dinov2_518.blocks[0].attn.qkv.weight)


def test_resnet_first_conv_adapted(tmp_path):
    r = timm.create_model("resnet18", num_classes=0)
    torch.save(r.state_dict(), tmp_path / "r.pt")
    b = create_backbone("resnet18", in_chans=13, init=str(tmp_path / "r.pt"))
    assert b.model.conv1.weight.shape[1] == 13 and b.embed_dim == 512
    assert torch.equal(b.model.layer4[1].conv2.weight, r.layer4[1].conv2.weight)
    assert b(torch.rand(1, 13, 64, 64)).shape == (1, 512)


def test_export_roundtrip_carries_architecture(tmp_path):
    b = create_backbone(NAME, in_chans=2, img_size=56, init="random")
    path = save_backbone(b, tmp_path / "export.safetensors")
    again = create_backbone(path)
    assert (again.name, again.in_chans, again.img_size) == (NAME, 2, 56)
    x = torch.rand(1, 2, 56, 56)
    b.eval(), again.eval()
    torch.testing.assert_close(again(x), b(x))
    with pytest.raises(DomainFMError, match="bands"):
        create_backbone(path, in_chans=13)


def test_token_drop_keeps_cls_and_cuts_tokens():
    from torch.utils.flop_counter import FlopCounterMode

    b = create_backbone(NAME, in_chans=3, img_size=56, init="random", depth=2).eval()
    x = torch.rand(2, 3, 56, 56)
    keep_all = torch.arange(16).expand(2, 16)
    # keeping every token in order is the plain forward
    torch.testing.assert_close(b(x, keep_all), b(x), atol=1e-5, rtol=1e-5)
    flops = {}
    for ratio in (0.0, 0.5, 0.75):
        n_keep = 16 - int(round(16 * ratio))
        keep = torch.stack([torch.randperm(16)[:n_keep].sort().values for _ in range(2)])
        with FlopCounterMode(display=False) as fc:
            out = b(x, keep)
            out.sum().backward()
        flops[ratio] = fc.get_total_flops()
        assert out.shape == (2, 384)
    assert flops[0.0] > flops[0.5] > flops[0.75]
    assert flops[0.5] < 0.65 * flops[0.0]


def test_embedding_parameters_found_from_structure():
    vit = create_backbone(NAME, init="random", img_size=56, depth=1)
    assert vit.embedding_parameters() == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert set(vit.embedding_parameters(with_pos_embed=True)) >= {"pos_embed", "cls_token"}
    res = create_backbone("resnet18", init="random")
    assert res.embedding_parameters() == ["conv1.weight", "bn1.weight", "bn1.bias"]
    cnx = create_backbone("convnext_atto", init="random")
    assert cnx.embedding_parameters() and all(n.startswith("stem.") for n in cnx.embedding_parameters())
    # CLIP's pre-norm works on tokens, not pixels: not part of the embedding
    clip = create_backbone("vit_base_patch16_clip_224", init="random", img_size=32, depth=1)
    assert clip.embedding_parameters() == ["patch_embed.proj.weight"]


@pytest.mark.timeout(40)  # the hub's offline retries alone would take ~47 s
def test_offline_dinov2_fails_fast_naming_weights():
    with pytest.raises(DomainFMError, match="--weights"):
        create_backbone(NAME, init="dinov2")


def test_bad_weights_files(tmp_path):
    torch.save({"epoch": 3, "note": "hi"}, tmp_path / "notsd.pt")
    with pytest.raises(DomainFMError, match="not a state dict"):
        read_state_dict(tmp_path / "notsd.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DomainFMError, match="safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    resnet = timm.create_model("resnet18", num_classes=0).state_dict()
    torch.save(resnet, tmp_path / "r.pt")
    # a ResNet's weights hold nothing a ViT has: said so, with where its tensors sit
    with pytest.raises(DomainFMError, match=rf"hold no parameter of VisionTransformer \(their {len(resnet)} tensors "
                                            r"sit under bn1, conv1, layer1, layer2, layer3, layer4\)"):
        create_backbone(NAME, init=str(tmp_path / "r.pt"), img_size=56)
    with pytest.raises(DomainFMError, match="unknown backbone"):
        create_backbone("vit_nonexistent_patch99", init="random")


@pytest.mark.parametrize("mask_mode", ["drop", "token"])
def test_token_drop_on_dynamic_img_size_vit(mask_mode):
    # models built with dynamic_img_size hand _pos_embed the [B, H, W, D] grid
    b = create_backbone(NAME, init="random", img_size=28, depth=1, dynamic_img_size=True).eval()
    b.add_mask_token()
    x = torch.rand(2, 3, 28, 28)
    keep = torch.tensor([[0, 2], [1, 3]])
    assert b(x, keep, mask_mode).shape == (2, 384)
    torch.testing.assert_close(b(x, torch.arange(4).expand(2, 4), mask_mode), b(x), atol=1e-5, rtol=1e-5)


SOFTCON = "torchgeo:ViTSmall14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON"


# ---------------------------------------------------------------- weight sources as data, one entry point

def _s1_export(tmp_path):
    """A 2-band ViT export recording its Sentinel-1 input (bands, dB statistics, 10 m GSD)."""
    from domainfm.backbones import InputSpec

    b = create_backbone(NAME, in_chans=2, img_size=56, init="random", depth=1)
    b.input_spec = InputSpec(bands=("VV", "VH"), mean=(-12.5, -20.0), std=(5.0, 5.5), modality="s1",
                             gsd_m=10.0, units="dB")
    return b, save_backbone(b, tmp_path / "s1.safetensors")


def test_weight_sources_say_what_they_carry(tmp_path):
    from domainfm.backbones import resolve_source

    _, path = _s1_export(tmp_path)
    src = resolve_source(str(path))
    assert (src.kind, src.architecture, src.in_chans, src.img_size) == ("file", NAME, 2, 56)
    assert src.bands == ("VV", "VH") and src.gsd_m == 10.0
    assert src.normalization == ((-12.5, -20.0), (5.0, 5.5))
    assert src.local_file() == path
    hub = resolve_source("dinov2", name=NAME)
    assert (hub.kind, hub.hub_name, hub.in_chans) == ("hub", NAME + ".lvd142m", 3)
    assert hub.normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # timm's ImageNet statistics
    assert resolve_source("pretrained", name="resnet18").hub_name == "resnet18"
    assert resolve_source("random").local_file() is None
    # torchgeo's enum (found by torchgeo.models.get_weight) carries SoftCon's 13 bands and statistics
    tg = resolve_source(SOFTCON)
    assert (tg.kind, tg.architecture, tg.in_chans, tg.img_size) == ("torchgeo", NAME, 13, 224)
    assert tg.bands[8] == "B8A" and len(tg.bands) == 13 and len(tg.normalization[0]) == 13


def test_read_metadata_is_the_header_without_torch(tmp_path):
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    from domainfm.backbones import read_metadata

    _, path = _s1_export(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        expected = f.metadata()
    assert read_metadata(path) == expected and expected["input_bands"] == '["VV", "VH"]'
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pth")
    assert read_metadata(tmp_path / "plain.pth") == {} and read_metadata(tmp_path / "missing.safetensors") == {}
    code = ("import json, sys; from domainfm.backbones import read_metadata; m = read_metadata(sys.argv[1]); "
            "print(json.dumps([m, sorted(k for k in ('torch', 'mlflow', 'timm') if k in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [expected, []]


def test_one_entry_point_for_names_weights_and_run_configs(tmp_path):
    from domainfm.config import RunConfig

    b, path = _s1_export(tmp_path)
    x = torch.rand(1, 2, 56, 56)
    # weights as the model itself: architecture, bands, size and input spec from the file
    again = create_backbone(str(path), depth=1).eval()  # (exports record no depth: a 1-block test model)
    assert (again.name, again.in_chans, again.img_size) == (NAME, 2, 56)
    assert again.input_spec.bands == ("VV", "VH")
    torch.testing.assert_close(again(x), b.eval()(x))
    with pytest.raises(DomainFMError, match="the model takes 2 bands but the data has 3"):
        create_backbone(str(path), in_chans=3)
    # a run starting from the export: --backbone names another architecture, the export's wins,
    # and its 2-band patch embedding is adapted to the run's 4 bands
    cfg = RunConfig(backbone="resnet18", weights=str(path), in_chans=4, img_size=56)
    run = create_backbone(cfg, depth=1)
    assert (run.name, run.in_chans) == (NAME, 4)
    torch.testing.assert_close(run.model.patch_embed.proj.weight,
                               adapt_patch_embed_weight(b.model.patch_embed.proj.weight, 4))
    assert torch.equal(run.model.blocks[0].mlp.fc1.weight, b.model.blocks[0].mlp.fc1.weight)
    # a name with cfg: cfg supplies what is not passed (here --init random, 4 bands, 56 px)
    named = create_backbone(NAME, cfg=cfg.replace(weights=None, init="random"), depth=1)
    assert (named.in_chans, named.img_size, named.input_spec) == (4, 56, None)


@pytest.mark.timeout(40)  # offline with nothing cached fails at once, not after the hub's retries
def test_torchgeo_softcon_weights_from_the_hub_cache(tmp_path, monkeypatch, dinov2_518):
    # torchgeo keeps its checkpoints in torch's hub cache; put one there under the name it expects
    from urllib.parse import urlparse

    from domainfm.backbones import torchgeo_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchgeo_weights(SOFTCON)
    assert weights.meta["in_chans"] == 13 and weights.meta["model"] == NAME
    with pytest.raises(DomainFMError, match="--weights"):
        create_backbone(NAME, in_chans=13, img_size=56, init=SOFTCON, depth=2)
    sd = dict(dinov2_518.state_dict())
    sd["patch_embed.proj.weight"] = torch.randn(384, 13, 14, 14)  # SoftCon's 13-band embedding
    ckpt = tmp_path / "hub" / "checkpoints" / Path(urlparse(weights.url).path).name
    ckpt.parent.mkdir(parents=True)
    torch.save(sd, ckpt)
    b = create_backbone(NAME, in_chans=13, img_size=56, init=SOFTCON, depth=2)
    assert torch.equal(b.model.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(b.model.blocks[1].attn.proj.weight, dinov2_518.blocks[1].attn.proj.weight)
    with pytest.raises(DomainFMError, match="--backbone vit_small_patch14_dinov2"):
        create_backbone("vit_base_patch14_dinov2", init=SOFTCON)
    with pytest.raises(DomainFMError, match="unknown torchgeo weights"):
        create_backbone(NAME, init="torchgeo:ViTSmall14_DINOv2_Weights.NOPE")


# ---------------------------------------------------------------- training checkpoints (issue 9, item 4)

def _dinov2_heads(seed: int) -> dict[str, torch.Tensor]:
    """DINO and iBOT heads as DINOv2 saves them: a 3-layer MLP and a weight-normed last layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for head in ("dino_head", "ibot_head"):
        for i, (o, n) in enumerate([(64, 384), (64, 64), (32, 64)]):
            out[f"{head}.mlp.{2 * i}.weight"] = torch.randn(o, n, generator=g)
            out[f"{head}.mlp.{2 * i}.bias"] = torch.randn(o, generator=g)
        out[f"{head}.last_layer.weight_g"] = torch.ones(128, 1)
        out[f"{head}.last_layer.weight_v"] = torch.randn(128, 32, generator=g)
    return out


@pytest.fixture(scope="module")
def vits14_teacher():
    """A real ViT-S/14 (12 blocks, dim 384; random init at 28 px) with its weights under DINOv2's
    key names: the backbone's own names plus the [1, 384] mask token."""
    torch.manual_seed(1)
    model = timm.create_model(NAME, num_classes=0, img_size=28)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["mask_token"] = torch.randn(1, 384)
    return sd


def _chunked(backbone: dict[str, torch.Tensor], chunks: int = 4) -> dict[str, torch.Tensor]:
    """DINOv2 with block_chunks=4: block i lives at blocks.<i // 3>.<i>."""
    import re

    per = 12 // chunks
    return {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // per}.{m.group(1)}.", k): v
            for k, v in backbone.items()}


def _under(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def _checkpoint(layout: str, teacher: dict[str, torch.Tensor]) -> dict:
    student = {k: v + 1.0 for k, v in teacher.items()}  # the student differs from the EMA teacher
    if layout == "dinov2_teacher_checkpoint":
        return {"teacher": {**_under("backbone.", teacher), **_dinov2_heads(0)}}
    if layout == "dinov2_chunked_blocks":
        return {"teacher": {**_under("backbone.", _chunked(teacher)), **_dinov2_heads(0)}}
    if layout == "dinov2_training_checkpoint":
        model = {**_under("student.backbone.", student), **_under("student.", _dinov2_heads(1)),
                 **_under("teacher.backbone.", teacher), **_under("teacher.", _dinov2_heads(0))}
        optimizer = {"state": {i: {"exp_avg": torch.randn(3), "exp_avg_sq": torch.rand(3)} for i in range(4)},
                     "param_groups": [{"lr": 1e-4, "params": [0, 1, 2, 3]}]}
        return {"model": model, "optimizer": optimizer, "iteration": 12499}
    if layout == "ddp_state_dict_with_projector":
        return {"state_dict": {**_under("module.backbone.", teacher),
                               "module.projector.0.weight": torch.randn(64, 384),
                               "module.projector.0.bias": torch.randn(64)}, "epoch": 3}
    raise AssertionError(layout)


LAYOUTS = ["dinov2_teacher_checkpoint", "dinov2_chunked_blocks", "dinov2_training_checkpoint",
           "ddp_state_dict_with_projector"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backbone_is_found_inside_training_checkpoints(tmp_path, vits14_teacher, layout):
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(_checkpoint(layout, vits14_teacher), path)
    # the file loads with weights_only=True: nothing but tensors, dicts, lists and numbers
    torch.load(path, weights_only=True)
    b = create_backbone(NAME, in_chans=3, img_size=28, init=str(path))
    got = b.model.state_dict()
    expected = {k: v for k, v in vits14_teacher.items() if k != "mask_token"}
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_training_checkpoint_through_weights_flag(tmp_path, vits14_teacher):
    from domainfm.config import RunConfig

    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(_checkpoint("dinov2_teacher_checkpoint", vits14_teacher), path)
    cfg = RunConfig(backbone=NAME, weights=str(path), img_size=28, in_chans=3)
    b = create_backbone(cfg)
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, vits14_teacher[k]), k


def test_architecture_mismatch_names_both_architectures(tmp_path, vits14_teacher):
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(_checkpoint("dinov2_teacher_checkpoint", vits14_teacher), path)
    with pytest.raises(DomainFMError) as e:
        create_backbone("vit_base_patch14_dinov2", img_size=28, init=str(path), depth=2)
    assert str(e.value) == (
        f"architecture mismatch: weights {path} hold 12 blocks of dim 384 (patch 14), --backbone "
        "vit_base_patch14_dinov2 has 2 blocks of dim 768 (patch 14). Fix: pass the --backbone these weights "
        "were trained with (these look like vit_small_patch14_dinov2).")


def test_dinov2_teacher_checkpoint_through_the_cli(tmp_path, vits14_teacher, mlflow_store):
    """``--weights teacher_checkpoint.pth`` as a user passes it: an sgd-ft run at learning rate 0
    exports exactly the teacher's backbone weights (and none of its DINO/iBOT heads)."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from conftest import load_make_data
    from domainfm.cli import main

    ckpt = tmp_path / "teacher_checkpoint.pth"
    torch.save(_checkpoint("dinov2_teacher_checkpoint", vits14_teacher), ckpt)
    data = load_make_data("sgd_ft").write_imagefolder(tmp_path / "data", train=2, val=1, size=28)
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(main, ["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", NAME,
                                    "--weights", str(ckpt), "--img-size", "28", "--batch-size", "6",
                                    "--accelerator", "cpu", "--max-steps", "1", "--lr", "0", "--no-measure-memory",
                                    "--json", str(out)])
    assert res.exit_code == 0, (res.stderr[-3000:], res.exception)
    exported = load_file(json.loads(out.read_text())["weights"])
    backbone = {k[len("backbone.model."):]: v for k, v in exported.items() if k.startswith("backbone.model.")}
    expected = {k: v for k, v in vits14_teacher.items() if k != "mask_token"}
    assert sorted(backbone) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(backbone[k], v), k
