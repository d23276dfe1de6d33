"""A tiny, fast SoftCon pretraining loop for the EO claims (1 SoftCon, 2 continual pretraining).

The product's `domainfm pretrain` runs the same recipe at a scale two shared CPU cores cannot
repeat over configurations and seeds within minutes (one 30-step ViT-Tiny run took ~160 s of wall
time on the shared machine, most of it MLflow logging and export). So these claims call the core's
own pieces in a short loop instead: `domainfm.losses.soft_contrastive_loss` (the loss the CLI
uses, with its `label_similarity` / `soft_target` / weights), `domainfm.masking.random_keep_indices`
(Siamese masking of the student: dropped tokens) and `domainfm.metrics.multilabel_average_precision`,
around an EMA teacher as in `tasks/pretrain.py`.

Data: patches written by `domainfm eo-sar sample` (Sentinel-2 L1C, 13 bands, Dynamic World land
cover rendered first, so pixels carry the classes; each patch keeps a random subset of its biome's
classes, so patches share classes in graded overlaps). Labels: a class is present when it covers
>= 1 % of the patch's valid land-cover pixels (the plugin's default threshold).
Model: timm ViT, 32 px input, patch 8 (16 tokens), width 64, depth 2, 2 heads; projector 64-128-64.
Views: two random 32 px crops with flips of the same patch (teacher unmasked, student masked).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

CROP = 32


def load_patches(root: Path) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(patch ids' biome index [N], images list of float32 [13, H, W] (log reflectance), labels [N, 9])."""
    import rasterio

    ids = sorted(p.stem for p in (Path(root) / "s2").glob("*.tif"))
    images, labels, biomes = [], [], []
    for pid in ids:
        with rasterio.open(Path(root) / "s2" / f"{pid}.tif") as f:
            img = f.read().astype(np.float32)
        with rasterio.open(Path(root) / "landcover" / f"{pid}.tif") as f:
            lc = f.read(1)
        valid = lc[lc != 255]
        frac = np.bincount(valid, minlength=9)[:9] / max(1, valid.size)
        images.append(np.log1p(img))  # 0 = nodata stays 0
        labels.append((frac >= 0.01).astype(np.float32))
        i = int(pid.split("_")[-1])
        biomes.append((i // 2) % 6)  # the sample generator's biome of patch i (synthetic.write_sample)
    return np.array(biomes), images, np.stack(labels)


def _standardise(images: list[np.ndarray], stats=None):
    if stats is None:
        allpix = np.concatenate([im.reshape(im.shape[0], -1) for im in images], axis=1)
        stats = (allpix.mean(axis=1)[:, None, None], allpix.std(axis=1)[:, None, None] + 1e-6)
    return [(im - stats[0]) / stats[1] for im in images], stats


def _crop(rng: np.random.Generator, im: np.ndarray, centre: bool = False) -> np.ndarray:
    _, h, w = im.shape
    y, x = ((h - CROP) // 2, (w - CROP) // 2) if centre else (rng.integers(0, h - CROP + 1), rng.integers(0, w - CROP + 1))
    out = im[:, y:y + CROP, x:x + CROP]
    if not centre:
        if rng.random() < 0.5:
            out = out[:, :, ::-1]
        if rng.random() < 0.5:
            out = out[:, ::-1, :]
    return np.ascontiguousarray(out)


def make_model(in_chans: int, seed: int):
    import timm
    import torch

    torch.manual_seed(seed)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=CROP, patch_size=8, in_chans=in_chans, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    proj = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    return torch.nn.ModuleDict({"backbone": vit, "proj": proj})


def encode(vit, x, keep_idx=None):
    """CLS feature [B, 64]; ``keep_idx`` [B, n_keep] drops the other patch tokens (Siamese masking)."""
    import torch

    tokens = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    if keep_idx is not None:
        tokens = torch.gather(tokens, 1, keep_idx[..., None].expand(-1, -1, tokens.shape[-1]))
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    h = vit.blocks(torch.cat([cls, tokens], dim=1))
    return vit.norm(h)[:, 0]


def pretrain(images, labels, *, steps: int, seed: int, model=None, batch: int = 32, lr: float = 1e-3,
             ema: float = 0.99, mask_ratio: float = 0.5, soft_weight: float = 1.0, hard_weight: float = 1.0,
             label_similarity: str = "cosine", soft_target: str = "ce", temperature: float = 0.1):
    """Train student + EMA teacher with the core's SoftCon loss; returns the teacher (ModuleDict)."""
    import torch

    from domainfm.losses import soft_contrastive_loss
    from domainfm.masking import random_keep_indices

    rng = np.random.default_rng(seed)
    student = model if model is not None else make_model(images[0].shape[0], seed)
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    n_patches = (CROP // 8) ** 2
    y_all = torch.from_numpy(labels)
    for _ in range(steps):
        idx = rng.choice(len(images), size=min(batch, len(images)), replace=False)
        xt = torch.from_numpy(np.stack([_crop(rng, images[i]) for i in idx]))
        xs = torch.from_numpy(np.stack([_crop(rng, images[i]) for i in idx]))
        keep = random_keep_indices(len(idx), n_patches, mask_ratio, generator=gen) if mask_ratio > 0 else None
        with torch.no_grad():
            zt = teacher["proj"](encode(teacher["backbone"], xt))
        zs = student["proj"](encode(student["backbone"], xs, keep))
        out = soft_contrastive_loss(zt, zs, y_all[idx], temperature=temperature, label_similarity=label_similarity,
                                    soft_target=soft_target, hard_weight=hard_weight, soft_weight=soft_weight)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(ema).add_(ps.detach(), alpha=1 - ema)
    # hand back a trainable copy of the teacher (the exported encoder, as in tasks/pretrain.py)
    return copy.deepcopy(teacher).requires_grad_(True)


def features(model, images) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.stack([_crop(None, im, centre=True) for im in images]))
    with torch.no_grad():
        return encode(model["backbone"], x).numpy()


def probe_map(feats: np.ndarray, labels: np.ndarray, *, seed: int = 0, k: int = 5) -> dict[str, float]:
    """Linear-probe and k-NN macro mAP on a fixed half/half split of held-out patches.

    Linear: one logistic regression per class (sklearn, C=1, standardised features); a class with a
    single value in the train half scores its train prevalence. k-NN: mean labels of the k nearest
    train patches by cosine similarity.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from domainfm.metrics import multilabel_average_precision

    n = len(feats)
    order = np.random.default_rng(1000 + seed).permutation(n)
    tr, te = order[: n // 2], order[n // 2:]
    sc = StandardScaler().fit(feats[tr])
    ftr, fte = sc.transform(feats[tr]), sc.transform(feats[te])
    lin = np.zeros((len(te), labels.shape[1]))
    for c in range(labels.shape[1]):
        y = labels[tr, c]
        if y.min() == y.max():
            lin[:, c] = y.mean()
        else:
            lin[:, c] = LogisticRegression(C=1.0, max_iter=500).fit(ftr, y).decision_function(fte)
    fn = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)
    sim = fn[te] @ fn[tr].T
    nn = np.argsort(-sim, axis=1)[:, :k]
    knn = labels[tr][nn].mean(axis=1)
    return {"linear": multilabel_average_precision(lin, labels[te])["macro"],
            "knn": multilabel_average_precision(knn, labels[te])["macro"]}


def prepare(root_train: Path, root_test: Path, stats=None):
    """Standardised train/test images (test uses the train statistics) with labels and biomes."""
    b_tr, im_tr, y_tr = load_patches(root_train)
    b_te, im_te, y_te = load_patches(root_test)
    im_tr, stats = _standardise(im_tr, stats)
    im_te, _ = _standardise(im_te, stats)
    return (b_tr, im_tr, y_tr), (b_te, im_te, y_te)
