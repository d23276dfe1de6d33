"""The pretraining health monitor's held-out split for eo-sar (``Plugin.monitor_dataset``).

Labelled patches of the native layout (``ROOT/<modality>/*.tif``) are drawn with
:func:`domainfm.monitor.held_out_indices` and taken out of the pretraining dataset. A native patch
has no location beyond itself, so each patch is its own group; SSL4EO-S12 samples ARE locations
(their seasons travel together), so there a sample is a location too. Standard layouts other than
the native one keep all their samples for pretraining (no monitor k-NN; RankMe still runs).
"""

from __future__ import annotations

import copy


def monitor_dataset(cfg, datamodule):
    """MonitorData of whole patches resized to ``cfg.img_size`` (bands aligned as for training),
    removed from ``datamodule.dataset``; None when the dataset has too few labelled patches."""
    from domainfm.monitor import MonitorData, held_out_indices
    from plugins.eo_sar.datasets import EOSARPatches
    from plugins.eo_sar.normalization import AlignBands
    from plugins.eo_sar.transforms import ResizeWhole

    ds = datamodule.dataset
    if not isinstance(ds, EOSARPatches):
        return None
    labelled = [i for i in range(len(ds)) if ds.labels_of(i) is not None and ds.labels_of(i).any()]
    held = held_out_indices(labelled, cfg.val_fraction, groups=[ds.files[i].patch_id for i in labelled],
                            seed=cfg.seed)
    if not held:
        return None
    taken = set(held)
    held_out = copy.copy(ds)
    held_out.files = [ds.files[i] for i in held]
    plan = datamodule.plan
    resize = ResizeWhole(cfg.img_size)
    held_out.transforms = AlignBands(plan.alignment, resize) if plan is not None else resize
    ds.files = [f for i, f in enumerate(ds.files) if i not in taken]  # pretraining never sees them
    return MonitorData(held_out, [f.patch_id for f in held_out.files],
                       f"{len(held)} labelled patches held out of {len(taken) + len(ds.files)}")
