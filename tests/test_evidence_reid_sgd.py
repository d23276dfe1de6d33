"""Evidence tests (issue 12, 0b) for two plugins: `--rerank` changes the ranked distances exactly as
k-reciprocal re-ranking (Zhong et al., CVPR 2017) says, and sgd-ft tests and exports the weights of
its best validation, not its last step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_sports_reid_rerank import dense_reference  # the loop-by-loop reading of the paper


def _reid_make_data():
    import importlib.util
    import sys
    from pathlib import Path

    name = "sports_reid_make_data"  # registered: its dataclasses look their module up
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "data" / "sports_reid" / "make_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_rerank_flag_gives_the_papers_distances_on_the_challenge_split(tmp_path, distance):
    from domainfm.backbones import create_backbone
    from domainfm.config import RunConfig
    from plugins.sports_reid.retrieval import embed, run_retrieval
    from plugins.sports_reid.jobs import eval_settings

    root = _reid_make_data().make_mmsports(tmp_path / "d", train_players=2, test_players=2, frames=6,
                                                       challenge_players=4)
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32, init="random")
    base = dict(plugin="sports-reid", accelerator="cpu", batch_size=8)
    opts = dict(distance=distance, flip_tta=False)
    on = eval_settings(RunConfig(**base, options={**opts, "rerank": True}))  # what --rerank builds
    off = eval_settings(RunConfig(**base, options={**opts, "rerank": False}))
    kw = dict(img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    reranked = run_retrieval(backbone, root, "challenge", on, **kw)
    plain = run_retrieval(backbone, root, "challenge", off, **kw)
    q = embed(backbone, reranked.query, off).numpy().astype(np.float64)
    g = embed(backbone, reranked.gallery, off).numpy().astype(np.float64)
    if distance == "cosine":  # the cosine setting re-ranks unit vectors
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
    expected = dense_reference(q, g, 20, 6, 0.3)  # the plugin's k1, k2, lambda
    assert reranked.distmat.shape == (len(q), len(g)) == expected.shape
    np.testing.assert_allclose(reranked.distmat, expected, rtol=1e-4, atol=1e-5)
    # and it is not the plain distance matrix (which the flag must change)
    assert np.abs(plain.distmat - reranked.distmat).max() > 1e-2


def test_sgd_ft_restores_the_best_validation_weights_before_testing():
    """KeepBest on a real Lightning loop whose validation score peaks mid-run: the weights put back
    are those of the best validation, which differ from the last step's."""
    import lightning as L

    from plugins.sgd_ft.task import KeepBest

    scores = iter([0.2, 0.9, 0.5, 0.4])  # the second validation (after step 4) is the best

    class Scripted(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(3, 1)
            self.snapshots = {}
            self.last_metrics = {}  # what FineTuneTask exposes to KeepBest

        def training_step(self, batch, batch_idx):
            return (self.model(batch[0]) - 1.0).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self):
            self.snapshots[self.trainer.global_step] = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.last_metrics = {"val/acc": next(scores)}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(16, 3))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    module = Scripted()
    keep = KeepBest("val/acc")
    trainer = L.Trainer(accelerator="cpu", max_steps=8, val_check_interval=2, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[keep])
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert keep.best == pytest.approx(0.9) and keep.best_step == 4
    last = {k: v.clone() for k, v in module.model.state_dict().items()}
    assert not torch.equal(last["weight"], module.snapshots[4]["weight"])
    keep.restore(module.model)
    for k, v in module.model.state_dict().items():
        torch.testing.assert_close(v, module.snapshots[4][k], rtol=0, atol=0)
