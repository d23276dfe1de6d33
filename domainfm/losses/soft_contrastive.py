"""SoftCon: contrastive loss with a hard (identity) target and a soft, multi-label target.

Notation (one direction)::

    A_ij = cos(z_teacher_i, z_student_j) / temperature        rows: teacher (unmasked view)
                                                              columns: student (masked view)
    hard = mean_i  -log softmax_j(A)_ii
    soft = mean_i  sum_j -T_ij log softmax_j(A)_ij,  T = S / rowsum(S)       (soft_target="ce")
    soft = mean_ij BCE(sigmoid(A_ij), S_ij)                                   (soft_target="bce")
    total = hard_weight * hard + soft_weight * soft

``S`` is the label similarity of the samples' multi-hot (or soft, in [0, 1]) label vectors,
cosine or Jaccard. Its diagonal is 1: a labelled sample is fully similar to itself, and a sample
with no label at all then has ``S_ii = 1`` and ``S_ij = 0`` elsewhere, so its soft target falls back
to the hard one (a column with no label gets ``S_ij = 0`` for ``i != j`` the same way). ``S`` is
symmetric, which the chunked path relies on. ``symmetric=True`` averages each term with the same
term computed on ``A``\\ᵀ (same ``S``); for ``bce`` the two directions are the same number.

Two ways to compute the same values and gradients:

* dense (``chunk_size=None``): the N x N matrices, plain autograd; this is the reference.
* chunked: blocks of ``chunk_size`` rows against all columns. The forward keeps only per-row and
  per-column statistics (row log-sum-exp, an online column log-sum-exp, row sums of ``S`` and of
  ``S * A``); the backward recomputes each block, so peak memory is O(N * chunk) instead of O(N²)
  (the tiling idea of "Breaking the Memory Barrier" for contrastive losses).

Under torch.distributed the embeddings and labels are all-gathered with gradients
(:func:`domainfm.distributed.all_gather_with_grad`), so every rank computes the loss of the
global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from domainfm.errors import DomainFMError

if TYPE_CHECKING:
    import torch

LABEL_SIMILARITIES = ("cosine", "jaccard")
SOFT_TARGETS = ("ce", "bce")


@dataclass
class SoftContrastiveOutput:
    """The loss terms, each a float scalar tensor; ``total`` is the one to backpropagate."""

    hard: "torch.Tensor"
    soft: "torch.Tensor"
    total: "torch.Tensor"


# --------------------------------------------------------------------------------------------
# label similarity


def label_similarity_block(
    labels_rows: "torch.Tensor", labels_cols: "torch.Tensor", kind: str, *, row_offset: int | None = None
) -> "torch.Tensor":
    """Similarity of every row label vector with every column label vector, ``[R, C]``.

    ``kind``: ``"cosine"`` (y_i·y_j / |y_i||y_j|) or ``"jaccard"`` (Σ min / Σ max). A pair where
    either vector is all zero gets 0. With ``row_offset`` the rows are rows ``row_offset...`` of
    the same batch as the columns, and their diagonal entries ``(k, row_offset + k)`` are set to 1
    (the self-similarity, also for samples with no label).
    """
    import torch

    if kind == "cosine":
        # a zero vector keeps norm 0 after the clamp, so its whole row/column is 0
        rows = labels_rows / labels_rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cols = labels_cols / labels_cols.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = rows @ cols.T
    elif kind == "jaccard":
        # for non-negative a, b: min = (a + b - |a - b|) / 2 and max = (a + b + |a - b|) / 2, so the
        # sums over classes need only the L1 norms and the pairwise L1 distance (no [R, C, K] tensor)
        total = labels_rows.sum(1)[:, None] + labels_cols.sum(1)[None, :]
        l1 = torch.cdist(labels_rows[None], labels_cols[None], p=1)[0]
        union = total + l1
        sim = torch.where(union > 0, (total - l1).clamp_min(0) / union.clamp_min(1e-12), torch.zeros_like(union))
    else:
        raise DomainFMError(
            f"unknown label similarity {kind!r}", fix=f"use one of {', '.join(LABEL_SIMILARITIES)} (--label-similarity)"
        )
    if row_offset is not None:
        sim.diagonal(offset=row_offset).fill_(1.0)
    return sim


def label_similarity_matrix(labels: "torch.Tensor", kind: str = "cosine") -> "torch.Tensor":
    """``S`` for one batch, ``[N, N]``, diagonal 1 (see the module docstring)."""
    return label_similarity_block(labels, labels, kind, row_offset=0)


# --------------------------------------------------------------------------------------------
# dense reference


def _dense_terms(t, s, labels, temperature, kind, soft_target, symmetric):
    import torch.nn.functional as F

    logits = t @ s.T / temperature
    sim = label_similarity_matrix(labels, kind)
    directions = [logits, logits.T] if symmetric else [logits]
    hards, softs = [], []
    for a in directions:
        log_prob = a.log_softmax(dim=1)
        hards.append(-log_prob.diagonal().mean())
        if soft_target == "ce":
            target = sim / sim.sum(dim=1, keepdim=True)
            softs.append(-(target * log_prob).sum(dim=1).mean())
        else:
            softs.append(F.binary_cross_entropy_with_logits(a, sim))
    return sum(hards) / len(hards), sum(softs) / len(softs)


# --------------------------------------------------------------------------------------------
# chunked (memory-bounded) path


def _blocks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _chunked_forward(t, s, labels, temperature, kind, soft_target, symmetric, chunk):
    """The two loss terms and the O(N) statistics the backward needs, one row block at a time."""
    import torch
    import torch.nn.functional as F

    n = t.shape[0]
    t_scaled = t / temperature  # folds 1/temperature into O(N*D) work instead of every block
    lse_row = t.new_empty(n)
    lse_col = t.new_full((n,), float("-inf")) if symmetric else None
    sim_rowsum = t.new_ones(n)
    sim_logit_row = t.new_empty(n)  # Σ_j S_ij A_ij
    sim_logit_col = t.new_zeros(n)  # Σ_i S_ij A_ij
    bce_sum = t.new_zeros(())
    for r0, r1 in _blocks(n, chunk):
        logits = t_scaled[r0:r1] @ s.T
        lse_row[r0:r1] = logits.logsumexp(dim=1)
        if symmetric:
            # online log-sum-exp down each column, block by block
            lse_col = torch.logaddexp(lse_col, logits.logsumexp(dim=0))
        sim = label_similarity_block(labels[r0:r1], labels, kind, row_offset=r0)
        if soft_target == "ce":
            sim_rowsum[r0:r1] = sim.sum(dim=1)
            weighted = sim.mul_(logits)  # sim is not needed after this
            sim_logit_row[r0:r1] = weighted.sum(dim=1)
            if symmetric:
                sim_logit_col += weighted.sum(dim=0)
        else:
            # BCE with logits, summed: softplus(a) - s * a
            bce_sum += F.softplus(logits).sum() - sim.mul_(logits).sum()
    diag = (t_scaled * s).sum(dim=1)  # A_ii

    hard = (lse_row - diag).mean()
    if symmetric:
        hard = 0.5 * (hard + (lse_col - diag).mean())
    if soft_target == "ce":
        # Σ_j -T_ij log softmax_j(A)_ij = lse_i - Σ_j T_ij A_ij, as Σ_j T_ij = 1
        soft = (lse_row - sim_logit_row / sim_rowsum).mean()
        if symmetric:
            # on Aᵀ: Σ_j T_ij A_ji, and S_ij = S_ji makes Σ_j S_ij A_ji the column sum of S*A
            soft = 0.5 * (soft + (lse_col - sim_logit_col / sim_rowsum).mean())
    else:
        soft = bce_sum / (n * n)  # both directions give this same value
    return hard, soft, lse_row, lse_col, sim_rowsum


def _chunked_backward(t, s, labels, temperature, kind, soft_target, symmetric, chunk,
                      lse_row, lse_col, sim_rowsum, grad_hard, grad_soft, need_t, need_s):
    """dL/dt, dL/ds from dL/dA recomputed block by block (``L = grad_hard*hard + grad_soft*soft``)."""
    import torch

    n = t.shape[0]
    t_scaled = t / temperature
    grad_t = torch.zeros_like(t) if need_t else None
    grad_s = torch.zeros_like(s) if need_s else None
    half = 0.5 if symmetric else 1.0
    grad_ce = grad_soft if soft_target == "ce" else torch.zeros_like(grad_soft)
    # d/dA_kl of hard_row and of ce_row are (P_kl - δ_kl)/n and (P_kl - T_kl)/n, P = softmax_rows(A);
    # of hard_col and ce_col (Q_kl - δ_kl)/n and (Q_kl - T_lk)/n, Q = softmax_columns(A), T_lk = S_kl/rowsum_l
    softmax_coef = half * (grad_hard + grad_ce) / n
    target_coef = -half * grad_ce / n / sim_rowsum  # per row k (row direction) or column l (column direction)
    for r0, r1 in _blocks(n, chunk):
        logits = t_scaled[r0:r1] @ s.T
        grad = (logits - lse_row[r0:r1, None]).exp_().mul_(softmax_coef)
        if symmetric:
            grad += (logits - lse_col[None, :]).exp_().mul_(softmax_coef)
        sim = label_similarity_block(labels[r0:r1], labels, kind, row_offset=r0)
        if soft_target == "ce":
            grad.addcmul_(sim, target_coef[r0:r1, None])
            if symmetric:
                grad.addcmul_(sim, target_coef[None, :])
        else:
            grad += logits.sigmoid_().sub_(sim).mul_(grad_soft / (n * n))
        # the hard target: half from each direction when symmetric, so grad_hard/n in total
        grad.diagonal(offset=r0).sub_(grad_hard / n)
        # A = t s^T / temperature
        if need_t:
            grad_t[r0:r1] = (grad @ s).div_(temperature)
        if need_s:
            grad_s.addmm_(grad.T, t_scaled[r0:r1])
    return grad_t, grad_s


_ChunkedLoss = None


def _chunked_function():
    # Built on first use: importing domainfm.losses must not import torch.
    global _ChunkedLoss
    if _ChunkedLoss is not None:
        return _ChunkedLoss
    import torch

    class ChunkedSoftContrastive(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, s, labels, temperature, kind, soft_target, symmetric, chunk):
            hard, soft, lse_row, lse_col, sim_rowsum = _chunked_forward(
                t, s, labels, temperature, kind, soft_target, symmetric, chunk
            )
            ctx.save_for_backward(t, s, labels, lse_row, lse_col if symmetric else lse_row, sim_rowsum)
            ctx.options = (temperature, kind, soft_target, symmetric, chunk)
            return hard, soft

        @staticmethod
        def backward(ctx, grad_hard, grad_soft):
            t, s, labels, lse_row, lse_col, sim_rowsum = ctx.saved_tensors
            temperature, kind, soft_target, symmetric, chunk = ctx.options
            # the backward recomputes the logits: in full precision too (autocast is thread-local)
            with torch.autocast(t.device.type, enabled=False):
                grad_t, grad_s = _chunked_backward(
                    t, s, labels, temperature, kind, soft_target, symmetric, chunk,
                    lse_row, lse_col, sim_rowsum, grad_hard, grad_soft,
                    ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                )
            return grad_t, grad_s, None, None, None, None, None, None

    _ChunkedLoss = ChunkedSoftContrastive
    return ChunkedSoftContrastive


# --------------------------------------------------------------------------------------------
# public entry point


def _check(z_teacher, z_student, labels, temperature, label_similarity, soft_target, chunk_size):
    if label_similarity not in LABEL_SIMILARITIES:
        raise DomainFMError(f"unknown label similarity {label_similarity!r}",
                            fix=f"use one of {', '.join(LABEL_SIMILARITIES)} (--label-similarity)")
    if soft_target not in SOFT_TARGETS:
        raise DomainFMError(f"unknown soft target {soft_target!r}", fix=f"use one of {', '.join(SOFT_TARGETS)} (--soft-target)")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise DomainFMError(f"chunk size must be a positive integer, got {chunk_size!r}",
                            fix="give --chunk-size N with N >= 1, or leave it out for the dense loss")
    if float(temperature) <= 0:
        raise DomainFMError(f"temperature must be positive, got {float(temperature)}", fix="give --temperature > 0 (e.g. 0.1)")
    if z_teacher.ndim != 2 or z_teacher.shape != z_student.shape:
        raise DomainFMError(
            f"teacher and student embeddings must both be [N, D], got {tuple(z_teacher.shape)} and {tuple(z_student.shape)}",
            fix="pass one pooled embedding per sample from each view",
        )
    if labels.ndim != 2 or labels.shape[0] != z_teacher.shape[0]:
        raise DomainFMError(
            f"labels must be [N, K] with N = {z_teacher.shape[0]} embeddings, got {tuple(labels.shape)}",
            fix="give one multi-hot label row per sample (all zeros where unknown)",
        )
    if z_teacher.shape[0] == 0:
        raise DomainFMError("empty batch", fix="give at least one sample")


def soft_contrastive_loss(
    z_teacher: "torch.Tensor",
    z_student: "torch.Tensor",
    labels: "torch.Tensor",
    *,
    temperature: float = 0.1,
    label_similarity: str = "cosine",
    soft_target: str = "ce",
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    symmetric: bool = False,
    chunk_size: int | None = None,
) -> SoftContrastiveOutput:
    """SoftCon loss of teacher (unmasked) vs student (masked) embeddings; see the module docstring.

    z_teacher, z_student: ``[N, D]`` (not necessarily normalised); labels: ``[N, K]`` multi-hot or
    soft in [0, 1], all-zero rows where unknown. ``chunk_size`` computes the same values and
    gradients in blocks of that many rows (memory O(N * chunk)); ``temperature`` must then be a
    number, not a learnable tensor. The loss is computed in float32 (float64 stays float64).
    """
    import torch
    import torch.nn.functional as F

    from domainfm.distributed import all_gather_with_grad, is_distributed

    _check(z_teacher, z_student, labels, temperature, label_similarity, soft_target, chunk_size)
    if is_distributed():
        # every rank gathers in the same order; the loss is then the global batch's
        z_teacher = all_gather_with_grad(z_teacher)
        z_student = all_gather_with_grad(z_student)
        labels = all_gather_with_grad(labels.detach())

    if chunk_size is not None and isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        raise DomainFMError("a learnable temperature is not supported by the chunked loss",
                            fix="pass a number as temperature, or chunk_size=None")
    dtype = torch.promote_types(z_teacher.dtype, torch.float32)
    # Under mixed precision (autocast) the matmuls would drop to bf16/fp16: logits / 0.1 in bf16
    # lose the digits the softmax needs, so the loss always runs in full precision.
    with torch.autocast(z_teacher.device.type, enabled=False):
        t = F.normalize(z_teacher.to(dtype), dim=1)
        s = F.normalize(z_student.to(dtype), dim=1)
        y = labels.detach().to(device=t.device, dtype=dtype)
        if chunk_size is None:
            hard, soft = _dense_terms(t, s, y, temperature, label_similarity, soft_target, symmetric)
        else:
            hard, soft = _chunked_function().apply(
                t, s, y, float(temperature), label_similarity, soft_target, bool(symmetric), int(chunk_size)
            )
    total = hard_weight * hard + soft_weight * soft
    return SoftContrastiveOutput(hard=hard, soft=soft, total=total)
