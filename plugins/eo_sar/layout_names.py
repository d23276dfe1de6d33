"""Names of the standard data layouts and what each expects (pure constants: the CLI reads them
without importing torch; the datasets are in :mod:`plugins.eo_sar.layouts`)."""

from __future__ import annotations

LAYOUTS = ("auto", "domainfm", "ssl4eo-s12", "bigearthnet", "bigearthnet-v2", "eurosat")
VIEWS = ("seasons", "crops")

# what each layout expects, for the one-line error of an unrecognised folder
EXPECTS = {
    "domainfm": "s2/ or s1/ holding <patch_id>.tif",
    "ssl4eo-s12": "s2c/, s2a/ or s1/ holding <7-digit location>/<acquisition>/<band>.tif",
    "bigearthnet": "bigearthnet-{train,val,test}.csv with BigEarthNet-v1.0/ or BigEarthNet-S1-v1.0/",
    "bigearthnet-v2": "metadata.parquet with BigEarthNet-S2/ or BigEarthNet-S1/ and Reference_Maps/",
    "eurosat": "eurosat-{train,val,test}.txt with ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/",
}
# modalities (``--modality``) each layout holds, and what they are there
LAYOUT_MODALITIES = {
    "ssl4eo-s12": {"s2": "s2c/ (L1C, 13 bands)", "s2-l2a": "s2a/ (L2A, 12 bands)", "s1": "s1/ (VV, VH)"},
    "bigearthnet": {"s2-l2a": "BigEarthNet-v1.0/ (L2A, 12 bands)", "s1": "BigEarthNet-S1-v1.0/ (VV, VH)"},
    "bigearthnet-v2": {"s2-l2a": "BigEarthNet-S2/ (L2A, 12 bands)", "s1": "BigEarthNet-S1/ (VV, VH)"},
    "eurosat": {"s2": "13-band L1C GeoTIFFs"},
}
