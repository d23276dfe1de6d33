from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class ToyScenes(Dataset):
    def __init__(self, n: int, bands: int, size: int, classes: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = (torch.rand(n, classes, generator=g) > 0.5).float()
        base = torch.randn(classes, bands, 1, 1, generator=g)
        self.images = torch.randn(n, bands, size, size, generator=g) * 0.3 + torch.einsum(
            "nk,kcij->ncij", self.labels, base)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        return {"view_teacher": x, "view_student": x.flip(-1), "labels": self.labels[i]}


class ToyDataModule(L.LightningDataModule):
    def __init__(self, n, bands, size, batch_size, classes, seed):
        super().__init__()
        self.args = (n, bands, size, classes, seed)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(ToyScenes(*self.args), batch_size=self.batch_size, shuffle=True, drop_last=True)


def evaluate(cfg):
    from domainfm.backbones import create_backbone

    backbone = create_backbone(cfg.model, cfg=cfg, in_chans=cfg.bands)
    ds = ToyScenes(8, cfg.bands, backbone.img_size, 4, cfg.seed)
    with torch.no_grad():
        feats = backbone(ds.images)
    return {"feature_norm": float(feats.norm(dim=1).mean())}
