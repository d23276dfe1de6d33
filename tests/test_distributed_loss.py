"""Under DDP the contrastive losses see the global batch: two gloo CPU processes, real DDP.

Each rank holds part of a global batch (uneven parts too: the last batch of an epoch). The loss
on every rank must equal the single-process loss on the whole batch, and the parameter gradients
that DDP leaves after its all-reduce (an *average* over ranks) must equal the single-process
gradients: all_gather_with_grad sums the incoming gradient over ranks for exactly that reason.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from domainfm.distributed import all_gather_with_grad, is_distributed
from domainfm.losses import info_nce_loss, soft_contrastive_loss

IN_DIM, EMBED_DIM, CLASSES = 6, 5, 4
CASES = {
    "dense-cosine-ce": dict(),
    "chunked-jaccard-bce-symmetric": dict(label_similarity="jaccard", soft_target="bce", symmetric=True, chunk_size=3),
    "chunked-cosine-ce-symmetric": dict(symmetric=True, chunk_size=2, hard_weight=0.5, soft_weight=2.0),
}


def global_batch(n):
    g = torch.Generator().manual_seed(0)
    x_teacher = torch.randn(n, IN_DIM, generator=g)
    x_student = torch.randn(n, IN_DIM, generator=g)
    labels = (torch.rand(n, CLASSES, generator=g) < 0.4).float()
    labels[1] = 0.0
    return x_teacher, x_student, labels


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(IN_DIM, EMBED_DIM)


def losses(model, x_teacher, x_student, labels):
    """Every loss of the test, each with its parameter gradients, in a fixed order on every rank."""
    results = {}
    for name, options in CASES.items():
        model.zero_grad()
        # one forward per backward (DDP's rule): both views through the model at once
        z = model(torch.cat([x_teacher, x_student]))
        z_teacher, z_student = z[: len(x_teacher)], z[len(x_teacher) :]
        loss = soft_contrastive_loss(z_teacher, z_student, labels, **options).total
        loss.backward()
        results[name] = (loss.detach().clone(), [p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    z = model(torch.cat([x_teacher, x_student]))
    loss = info_nce_loss(z[: len(x_teacher)], z[len(x_teacher) :], logit_scale=10.0, label_smoothing=0.1)
    loss.backward()
    results["info-nce"] = (loss.detach().clone(), [p.grad.clone() for p in model.parameters()])
    return results


LAYOUTS = {"even": (4, 4), "uneven": (5, 3)}  # rows of the global batch held by rank 0 and rank 1


def _worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for layout, rows_per_rank in LAYOUTS.items():  # one spawn for both: starting processes is the slow part
            start = sum(rows_per_rank[:rank])
            stop = start + rows_per_rank[rank]
            x_teacher, x_student, labels = (t[start:stop] for t in global_batch(sum(rows_per_rank)))
            model = DistributedDataParallel(make_model())
            results = losses(model, x_teacher, x_student, labels)
            # the raw gather: what each rank's own rows receive
            leaf = x_teacher[:, :EMBED_DIM].clone().requires_grad_()
            gathered = all_gather_with_grad(leaf)
            (gathered * torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)).sum().backward()
            results["gather"] = (gathered.detach(), [leaf.grad])
            results["is_distributed"] = torch.tensor(is_distributed())
            torch.save(results, os.path.join(out_dir, f"{layout}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    world_size = 2
    mp.spawn(_worker, args=(world_size, str(out_dir / "pg-init"), str(out_dir)), nprocs=world_size, join=True)
    return {
        layout: [torch.load(out_dir / f"{layout}-rank{r}.pt", weights_only=True) for r in range(world_size)]
        for layout in LAYOUTS
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gathered_loss_and_ddp_gradients_equal_the_single_process_ones(rank_results, layout):
    rows_per_rank = LAYOUTS[layout]
    world_size = len(rows_per_rank)
    ranks = rank_results[layout]

    assert not is_distributed()  # here, no process group: the gather is the identity
    x_teacher, x_student, labels = global_batch(sum(rows_per_rank))
    expected = losses(make_model(), x_teacher, x_student, labels)
    for rank, got in enumerate(ranks):
        assert got["is_distributed"].item()
        for name in [*CASES, "info-nce"]:
            loss, grads = got[name]
            ref_loss, ref_grads = expected[name]
            assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5), (rank, name)
            for grad, ref_grad in zip(grads, ref_grads):
                # DDP averaged over ranks; each rank's backward summed the gathered gradient over ranks
                torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)

    # the raw gather: rows in rank order, and each rank's rows get world_size times d(sum)/d(row)
    leaf_global = x_teacher[:, :EMBED_DIM]
    weights = torch.arange(leaf_global.numel(), dtype=torch.float32).view_as(leaf_global)
    start = 0
    for rank, got in enumerate(ranks):
        gathered, (leaf_grad,) = got["gather"]
        assert torch.equal(gathered, leaf_global)
        stop = start + rows_per_rank[rank]
        assert torch.equal(leaf_grad, world_size * weights[start:stop])
        start = stop


def test_gather_is_the_identity_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
