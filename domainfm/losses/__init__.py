"""Contrastive losses (one loss per module).

- :func:`soft_contrastive_loss` (``soft_contrastive.py``): SoftCon, hard identity target plus a
  soft multi-label target, dense or chunked (memory O(N * chunk)); continual pretraining.
- :func:`info_nce_loss` (``info_nce.py``): image-to-image InfoNCE; contrastive fine-tuning.

Both gather the global batch under torch.distributed. Importing this package imports no torch.
"""

from domainfm.losses.info_nce import info_nce_loss
from domainfm.losses.soft_contrastive import SoftContrastiveOutput, soft_contrastive_loss

__all__ = ["SoftContrastiveOutput", "info_nce_loss", "soft_contrastive_loss"]
