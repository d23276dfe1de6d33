"""The pretraining health monitor's held-out split for eo-sar (``Plugin.monitor_dataset``).

Labelled patches are drawn with :func:`domainfm.monitor.held_out_indices`, grouped by where they
lie, and taken out of the pretraining dataset, in every layout:

- the native layout (``ROOT/<modality>/*.tif``): a native patch has no location beyond itself, so
  each patch is its own group;
- SSL4EO-S12: a sample IS a location (its four seasons travel together), so each location is a
  group, and the held-out split reads its first season (no random season);
- BigEarthNet v1: patches named ``<S2 product>_<row>_<col>`` are cut from one Sentinel-2 tile
  acquisition, so the product (the name without ``_<row>_<col>``) is the group;
- BigEarthNet v2: the tile folder (``<S2 product>_<tile>``, the patch id without ``_<row>_<col>``)
  is the group;
- EuroSAT: images carry no location, so each image is its own group (single-label: k-NN accuracy).
"""

from __future__ import annotations

import copy


def location_of(layout: str, patch_id: str) -> str:
    """The group (location or tile) a patch of ``layout`` belongs to, from its id (see above)."""
    if layout in ("bigearthnet", "bigearthnet-v2"):
        parts = patch_id.split("_")
        return "_".join(parts[:-2]) if len(parts) > 2 else patch_id
    return patch_id  # native patches, SSL4EO-S12 locations, EuroSAT images


def monitor_dataset(cfg, datamodule):
    """MonitorData of whole patches resized to ``cfg.img_size`` (bands aligned as for training),
    removed from ``datamodule.dataset``, with their location groups; None when the dataset has too
    few labelled patches (or locations) to hold any out."""
    from domainfm.monitor import MonitorData, held_out_indices
    from plugins.eo_sar.datasets import EOSARPatches
    from plugins.eo_sar.layouts import LayoutPatches
    from plugins.eo_sar.normalization import AlignBands
    from plugins.eo_sar.transforms import ResizeWhole

    ds = datamodule.dataset
    if isinstance(ds, EOSARPatches):
        items, layout, field = ds.files, "domainfm", "files"
    elif isinstance(ds, LayoutPatches):
        items, layout, field = ds.records, ds.layout, "records"
    else:
        return None
    labelled = [i for i in range(len(ds)) if ds.labels_of(i) is not None and ds.labels_of(i).any()]
    groups = [location_of(layout, items[i].patch_id) for i in labelled]
    # two locations at least: the k-NN leaves a sample's own location out of its neighbours
    held = held_out_indices(labelled, cfg.val_fraction, groups=groups, seed=cfg.seed, min_groups=2)
    if not held:
        return None
    taken = set(held)
    held_out = copy.copy(ds)
    setattr(held_out, field, [items[i] for i in held])
    if isinstance(ds, LayoutPatches):
        held_out.random_season = False  # the first season of a location, the same at every evaluation
    plan = datamodule.plan
    resize = ResizeWhole(cfg.img_size)
    held_out.transforms = AlignBands(plan.alignment, resize) if plan is not None else resize
    setattr(ds, field, [f for i, f in enumerate(items) if i not in taken])  # pretraining never sees them
    held_groups = [location_of(layout, items[i].patch_id) for i in held]
    n_groups = len(set(held_groups))
    return MonitorData(held_out, held_groups,
                       f"{len(held)} labelled patches ({n_groups} locations) held out of {len(items)}")
