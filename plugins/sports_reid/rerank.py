"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), computed in blocks.

The textbook version holds two (Q+G) x (Q+G) dense matrices (the distances and the neighbour
weights V): 24 GB at 5,000 queries x 50,000 gallery items. Here the only dense memory is the
Q x G result: the distances of each row block are computed, reduced to the k1+1 nearest
neighbours and thrown away; V is sparse (each row has at most (k1+1)(k1/2+2) entries), and the
Jaccard distance is accumulated one query block at a time through V's columns.

Distances are squared Euclidean between the features (pass L2-normalised features for the cosine
setting: their squared Euclidean distance is 2 - 2 cos, the same neighbours).
"""

from __future__ import annotations

import numpy as np

from domainfm.errors import DomainFMError

#: The settings ``--rerank`` uses (the paper's Market-1501 values).
K1, K2, LAMBDA = 20, 6, 0.3


def check_rerank(n_items: int, *, k1: int = K1, k2: int = K2, path=None) -> None:
    """DomainFMError unless re-ranking can run on ``n_items`` query + gallery features with
    ``k1``/``k2``: ``1 <= k2 <= k1 + 1`` and more than ``k1`` items (each needs k1 + 1 neighbours).
    Pure and cheap: the plugin calls it on the file counts before any run or model exists."""
    if not 1 <= k2 <= k1 + 1 or k1 < 1:
        raise DomainFMError(f"re-ranking needs 1 <= k2 <= k1 + 1, got k1={k1}, k2={k2}", path=path)
    if n_items < k1 + 1:
        raise DomainFMError(f"re-ranking with k1={k1} needs more than {k1} images in query + gallery, got {n_items}",
                            path=path, fix="use --no-rerank on a set this small")


def _as_float_tensor(x):
    import torch

    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.detach().to("cpu", torch.float32)


def _squared_distances(a, b, a_sq, b_sq):
    """|a - b|^2 for every row pair, as a torch float32 [len(a), len(b)] matrix."""
    import torch

    return torch.addmm(b_sq[None, :], a, b.T, alpha=-2.0).add_(a_sq[:, None]).clamp_(min=0.0)


def nearest_neighbours(feats, k: int, *, block_size: int = 512, on_block=None):
    """The k nearest rows of every row (itself first) and each row's largest squared distance.

    Returns numpy (ranks int64 [N, k], row_max float32 [N]). Memory: one block_size x N block.
    """
    import torch

    n = feats.shape[0]
    sq = (feats * feats).sum(1)
    ranks = np.empty((n, k), dtype=np.int64)
    row_max = np.empty(n, dtype=np.float32)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        # |x_j|^2 - 2 x_i.x_j: the row's constant |x_i|^2 changes neither the order nor the argmax
        d = torch.addmm(sq[None, :], feats[start:stop], feats.T, alpha=-2.0)
        local = torch.arange(stop - start)
        diag = d[local, local + start].clone()
        # a row is its own nearest neighbour even when another row is an exact duplicate of it
        d[local, local + start] = -torch.inf
        row_max[start:stop] = torch.maximum(d.max(1).values, diag).add_(sq[start:stop]).numpy()
        ranks[start:stop] = torch.topk(d, k, dim=1, largest=False, sorted=True).indices.numpy()
        if on_block is not None:
            on_block()
    return ranks, row_max


def reciprocal_mask(ranks, k: int, *, block_size: int = 4096):
    """mask[i, a] is True when ranks[i, a] (one of i's k+1 nearest) also has i among its k+1 nearest."""
    forward = ranks[:, : k + 1]
    mask = np.empty(forward.shape, dtype=bool)
    for start in range(0, len(forward), block_size):
        stop = min(start + block_size, len(forward))
        back = forward[forward[start:stop]]  # [b, k+1, k+1]
        mask[start:stop] = (back == np.arange(start, stop)[:, None, None]).any(-1)
    return mask


def k_reciprocal_weights(feats, ranks, row_max, *, k1: int, block_size: int = 1024):
    """The sparse V of the paper: for each row, Gaussian-kernel weights (normalised to sum 1) on
    its expanded k-reciprocal neighbours. ``feats`` numpy float32 [N, D]. Returns scipy CSR [N, N]."""
    import scipy.sparse as sp

    n = feats.shape[0]
    half = int(np.around(k1 / 2.0))
    fwd, fwd_ok = ranks[:, : k1 + 1], reciprocal_mask(ranks, k1)
    half_fwd, half_ok = ranks[:, : half + 1], reciprocal_mask(ranks, half)
    sq = np.einsum("ij,ij->i", feats, feats)
    # member[r, j]: is j in R(start + r)? set and cleared per block (a set lookup for every row at once)
    member = np.zeros((min(block_size, n), n), dtype=bool)
    rows_out, cols_out, vals_out = [], [], []
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        local = np.arange(stop - start)[:, None]
        cand, cand_ok = fwd[start:stop], fwd_ok[start:stop]  # [b, K]: the k-reciprocal set R(i)
        member[local, cand] = cand_ok
        sub, sub_ok = half_fwd[cand], half_ok[cand]  # [b, K, H]: R(c, k1/2) of each candidate c
        overlap = (member[local[:, :, None], sub] & sub_ok).sum(-1)
        member[local, cand] = False
        # a candidate's own set joins when more than 2/3 of it lies in R(i)
        accept = cand_ok & (overlap > (2.0 / 3.0) * sub_ok.sum(-1))
        members = np.concatenate([np.where(cand_ok, cand, n),
                                  np.where(sub_ok & accept[..., None], sub, n).reshape(len(cand), -1)], 1)
        members.sort(axis=1)
        keep = members != n  # n: "no member"
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        rows, slots = np.nonzero(keep)
        cols = members[rows, slots]
        grow = rows + start
        d = np.maximum(sq[grow] + sq[cols] - 2.0 * np.einsum("ij,ij->i", feats[grow], feats[cols]), 0.0)
        w = np.exp(-d / row_max[grow])
        w /= np.bincount(rows, weights=w, minlength=stop - start)[rows]
        rows_out.append(grow)
        cols_out.append(cols)
        vals_out.append(w.astype(np.float32))
    return sp.csr_matrix((np.concatenate(vals_out), (np.concatenate(rows_out), np.concatenate(cols_out))),
                         shape=(n, n), dtype=np.float32)


def query_expansion(v, ranks, k2: int):
    """Each row of V replaced by the mean of the rows of its k2 nearest neighbours (itself included)."""
    import scipy.sparse as sp

    n = v.shape[0]
    if k2 == 1:
        return v
    rows = np.repeat(np.arange(n), k2)
    cols = ranks[:, :k2].ravel()
    avg = sp.csr_matrix((np.full(rows.size, 1.0 / k2, dtype=np.float32), (rows, cols)), shape=(n, n))
    return (avg @ v).tocsr()


def jaccard_block(vq, vg_csc, n_gallery: int):
    """sum_k min(Vq[i, k], Vg[j, k]) for a block of query rows against every gallery row, dense [b, G].

    Only (i, k, j) with both entries non-zero contribute (weights are >= 0): each non-zero of the
    query block is joined with the non-zeros of Vg's column k.
    """
    vq = vq.tocoo()
    starts, ends = vg_csc.indptr[vq.col], vg_csc.indptr[vq.col + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    out_rows = np.repeat(vq.row, lengths)
    q_vals = np.repeat(vq.data, lengths)
    # positions starts[t], ..., ends[t]-1 for every non-zero t, without a Python loop
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.repeat(starts, lengths) + offsets
    mins = np.minimum(q_vals, vg_csc.data[pos])
    flat = out_rows.astype(np.int64) * n_gallery + vg_csc.indices[pos]
    return np.bincount(flat, weights=mins, minlength=vq.shape[0] * n_gallery).reshape(vq.shape[0], n_gallery)


def re_ranking(query_feats, gallery_feats, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               block_size: int = 512, progress=None) -> np.ndarray:
    """k-reciprocal re-ranked distances, float32 [Q, G]: (1 - lambda) Jaccard + lambda original.

    The original distance of each query row is its squared Euclidean distance divided by the
    largest distance of that row over all Q+G items, as in the paper. ``progress(step, total)``
    is called as blocks finish (for a progress bar).
    """
    import torch

    q = _as_float_tensor(query_feats)
    g = _as_float_tensor(gallery_feats)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise DomainFMError(f"re-ranking needs query and gallery features of the same width, got "
                            f"{tuple(q.shape)} and {tuple(g.shape)}")
    n_q, n_g = len(q), len(g)
    n = n_q + n_g
    check_rerank(n, k1=k1, k2=k2)
    feats = torch.cat([q, g])
    # query rows per Jaccard block: keep the dense float64 accumulator near 4M entries
    q_block = max(1, min(block_size, (1 << 22) // max(n_g, 1)))
    total = -(-n // block_size) + -(-n_q // q_block)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    with torch.inference_mode():
        ranks, row_max = nearest_neighbours(feats, k1 + 1, block_size=block_size, on_block=step)
        row_max = np.maximum(row_max, 1e-12)
        v = k_reciprocal_weights(feats.numpy(), ranks, row_max, k1=k1, block_size=2 * block_size)
        v = query_expansion(v, ranks, k2)
        vq, vg_csc = v[:n_q], v[n_q:].tocsc()
        out = np.empty((n_q, n_g), dtype=np.float32)
        sq = (feats * feats).sum(1)
        for start in range(0, n_q, q_block):
            stop = min(start + q_block, n_q)
            shared = jaccard_block(vq[start:stop], vg_csc, n_g)
            jaccard = 1.0 - shared / (2.0 - shared)
            original = _squared_distances(feats[start:stop], g, sq[start:stop], sq[n_q:]).numpy()
            original /= row_max[start:stop, None]
            out[start:stop] = (1.0 - lambda_value) * jaccard + lambda_value * original
            step()
    return out
