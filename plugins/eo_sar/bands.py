"""Band and class names of the eo-sar plugin (pure constants: safe to import anywhere)."""

from __future__ import annotations

# Sentinel-2 L1C band order as shipped in SAFE/BigEarthNet-style patches (B8A after B8).
S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
# Sentinel-1 GRD dual polarisation, backscatter in dB.
S1_BANDS = ("VV", "VH")

BANDS = {"s2": S2_BANDS, "s1": S1_BANDS}
MODALITIES = tuple(BANDS)
MODALITY_NAMES = {"s2": "Sentinel-2 multispectral", "s1": "Sentinel-1 SAR"}

# Dynamic World land-cover classes; the class id in landcover/ rasters is the index here.
CLASS_NAMES = (
    "water",
    "trees",
    "grass",
    "flooded_vegetation",
    "crops",
    "shrub_and_scrub",
    "built",
    "bare",
    "snow_and_ice",
)
LANDCOVER_NODATA = 255

# True-colour bands (B4, B3, B2) as indices into S2_BANDS, for plots.
S2_RGB = (S2_BANDS.index("B4"), S2_BANDS.index("B3"), S2_BANDS.index("B2"))

STATS_FILE = ".domainfm_stats_{modality}.json"
LANDCOVER_CACHE_FILE = ".domainfm_landcover.json"
FILES_CACHE_FILE = ".domainfm_files_{modality}.json"
LABELS_FILE = "labels.csv"
