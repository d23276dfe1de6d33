"""SoftCon and InfoNCE losses against hand-computed numbers and a naive per-element loop."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from domainfm.errors import DomainFMError
from domainfm.losses import SoftContrastiveOutput, info_nce_loss, soft_contrastive_loss
from domainfm.losses.soft_contrastive import label_similarity_matrix

COMBOS = list(itertools.product(["cosine", "jaccard"], ["ce", "bce"], [False, True]))


def multi_hot(label_sets, num_classes):
    y = torch.zeros(len(label_sets), num_classes)
    for i, classes in enumerate(label_sets):
        y[i, list(classes)] = 1.0
    return y


# ---------------------------------------------------------------------------------------------
# the worked example of the issue (Dynamic World, 9 classes)

EXAMPLE_LABELS = multi_hot([{0, 4, 6}, {4, 6}, {1, 2, 5}, {0}], 9)
EXAMPLE_TEACHER = torch.tensor([[1, 0.2, 0], [0.8, 0.6, 0.1], [-0.2, 0.1, 1], [0.9, -0.4, 0.2]])
EXAMPLE_STUDENT = torch.tensor([[0.9, 0.3, 0.1], [0.7, 0.7, 0], [0, 0.2, 0.9], [1, -0.2, 0]])


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_worked_example_matches_the_issue(chunk_size):
    out = soft_contrastive_loss(EXAMPLE_TEACHER, EXAMPLE_STUDENT, EXAMPLE_LABELS, temperature=0.1, chunk_size=chunk_size)
    assert isinstance(out, SoftContrastiveOutput)
    assert out.hard.dtype == torch.float32 and out.hard.ndim == 0
    assert out.hard.item() == pytest.approx(0.305073, abs=1e-5)
    assert out.soft.item() == pytest.approx(0.713029, abs=1e-5)
    assert out.total.item() == pytest.approx(1.018102, abs=1e-5)


def test_label_similarity_by_hand():
    s_cos = label_similarity_matrix(EXAMPLE_LABELS, "cosine")
    s_jac = label_similarity_matrix(EXAMPLE_LABELS, "jaccard")
    # {0,4,6} vs {4,6}: 2 shared of 3 and 2 → cos 2/sqrt(6), jaccard 2/3; {0,4,6} vs {0}: 1/sqrt(3), 1/3
    assert s_cos[0, 1].item() == pytest.approx(2 / math.sqrt(6), abs=1e-6)
    assert s_cos[0, 3].item() == pytest.approx(1 / math.sqrt(3), abs=1e-6)
    assert s_jac[0, 1].item() == pytest.approx(2 / 3, abs=1e-6)
    assert s_jac[3, 0].item() == pytest.approx(1 / 3, abs=1e-6)
    assert s_cos[2, :2].tolist() == [0.0, 0.0] and s_jac[2, 3].item() == 0.0  # nothing shared
    assert torch.allclose(s_cos.diagonal(), torch.ones(4)) and torch.allclose(s_jac.diagonal(), torch.ones(4))
    # soft labels: Σ min = 0.5 + 0.2, Σ max = 1 + 1
    soft = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.2, 0.0], [0.0, 0.0, 0.0]])
    s = label_similarity_matrix(soft, "jaccard")
    assert s[0, 1].item() == pytest.approx(0.35, abs=1e-6)
    # a sample with no label: 1 with itself, 0 with everyone (both as row and as column)
    assert s[2].tolist() == [0.0, 0.0, 1.0] and s[:, 2].tolist() == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# a naive per-element implementation, written from the formulas with scalar autograd


def naive_soft_contrastive(zt, zs, labels, *, temperature, kind, soft_target, symmetric, hard_weight, soft_weight):
    n, dim = zt.shape
    y = labels.tolist()

    def cos(u, v):
        dot = sum(u[d] * v[d] for d in range(dim))
        return dot / (torch.sqrt(sum(u[d] ** 2 for d in range(dim))) * torch.sqrt(sum(v[d] ** 2 for d in range(dim))))

    def label_sim(i, j):
        a, b = y[i], y[j]
        if not any(a):
            return 1.0 if i == j else 0.0  # the fallback of the issue
        if not any(b):
            return 0.0
        if kind == "cosine":
            return sum(p * q for p, q in zip(a, b)) / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))
        return sum(min(p, q) for p, q in zip(a, b)) / sum(max(p, q) for p, q in zip(a, b))

    logits = [[cos(zt[i], zs[j]) / temperature for j in range(n)] for i in range(n)]
    sim = [[label_sim(i, j) for j in range(n)] for i in range(n)]

    def one_direction(a):
        hard, soft = 0.0, 0.0
        for i in range(n):
            lse = torch.log(sum(torch.exp(a[i][j]) for j in range(n)))
            hard = hard + (lse - a[i][i]) / n
            if soft_target == "ce":
                row_sum = sum(sim[i])
                for j in range(n):
                    soft = soft - sim[i][j] / row_sum * (a[i][j] - lse) / n
            else:
                for j in range(n):
                    p = torch.sigmoid(a[i][j])
                    soft = soft - (sim[i][j] * torch.log(p) + (1 - sim[i][j]) * torch.log(1 - p)) / (n * n)
        return hard, soft

    hard, soft = one_direction(logits)
    if symmetric:
        hard_t, soft_t = one_direction([[logits[j][i] for j in range(n)] for i in range(n)])
        hard, soft = (hard + hard_t) / 2, (soft + soft_t) / 2
    return hard, soft, hard_weight * hard + soft_weight * soft


def _small_batch(n=6, dim=4, classes=5, soft_labels=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, dim, generator=g, dtype=torch.float64)
    zs = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if soft_labels:
        labels = torch.rand(n, classes, generator=g, dtype=torch.float64) * (torch.rand(n, classes, generator=g) < 0.6)
    else:
        labels = (torch.rand(n, classes, generator=g) < 0.4).double()
    labels[1] = 0.0  # one sample with no label at all
    labels[4] = labels[2]  # two samples with the same labels
    return zt, zs, labels


@pytest.mark.parametrize("kind,soft_target,symmetric", COMBOS)
@pytest.mark.parametrize("soft_labels", [False, True])
def test_matches_naive_loop_values_and_gradients(kind, soft_target, symmetric, soft_labels):
    zt, zs, labels = _small_batch(soft_labels=soft_labels)
    options = dict(temperature=0.2, symmetric=symmetric, hard_weight=0.7, soft_weight=1.3)
    zt_ref, zs_ref = zt.clone().requires_grad_(), zs.clone().requires_grad_()
    hard, soft, total = naive_soft_contrastive(zt_ref, zs_ref, labels, kind=kind, soft_target=soft_target, **options)
    total.backward()
    for chunk_size in (None, 4):
        zt_new, zs_new = zt.clone().requires_grad_(), zs.clone().requires_grad_()
        out = soft_contrastive_loss(zt_new, zs_new, labels, label_similarity=kind, soft_target=soft_target,
                                    chunk_size=chunk_size, **options)
        out.total.backward()
        assert out.hard.item() == pytest.approx(hard.item(), abs=1e-10)
        assert out.soft.item() == pytest.approx(soft.item(), abs=1e-10)
        assert out.total.item() == pytest.approx(total.item(), abs=1e-10)
        torch.testing.assert_close(zt_new.grad, zt_ref.grad, atol=1e-10, rtol=0)
        torch.testing.assert_close(zs_new.grad, zs_ref.grad, atol=1e-10, rtol=0)


def test_no_labels_at_all_falls_back_to_the_hard_target():
    zt, zs, _ = _small_batch()
    empty = torch.zeros(6, 5, dtype=torch.float64)
    ce = soft_contrastive_loss(zt, zs, empty, soft_target="ce")
    assert ce.soft.item() == pytest.approx(ce.hard.item(), abs=1e-12)
    # bce with S = identity, against torch's own BCE on probabilities
    bce = soft_contrastive_loss(zt, zs, empty, soft_target="bce", temperature=0.5)
    logits = F.normalize(zt, dim=1) @ F.normalize(zs, dim=1).T / 0.5
    expected = F.binary_cross_entropy(torch.sigmoid(logits), torch.eye(6, dtype=torch.float64))
    assert bce.soft.item() == pytest.approx(expected.item(), abs=1e-10)


def test_hard_term_equals_torch_cross_entropy_and_weights_combine():
    zt, zs, labels = _small_batch(n=7)
    out = soft_contrastive_loss(zt, zs, labels, temperature=0.07, hard_weight=0.25, soft_weight=2.0, symmetric=True)
    logits = F.normalize(zt, dim=1) @ F.normalize(zs, dim=1).T / 0.07
    target = torch.arange(7)
    expected_hard = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert out.hard.item() == pytest.approx(expected_hard.item(), abs=1e-10)
    assert out.total.item() == pytest.approx(0.25 * out.hard.item() + 2.0 * out.soft.item(), abs=1e-10)


# ---------------------------------------------------------------------------------------------
# chunked == dense


@pytest.mark.parametrize("kind,soft_target,symmetric", COMBOS)
def test_chunked_equals_dense_values_and_gradients(kind, soft_target, symmetric):
    g = torch.Generator().manual_seed(1)
    n, dim, classes = 23, 16, 7
    zt = torch.randn(n, dim, generator=g)
    zs = torch.randn(n, dim, generator=g)
    labels = (torch.rand(n, classes, generator=g) < 0.3).float()
    labels[[0, 5, 22]] = 0.0
    labels[7] = torch.rand(classes, generator=g)  # one soft label row
    options = dict(temperature=0.1, label_similarity=kind, soft_target=soft_target, symmetric=symmetric,
                   hard_weight=0.8, soft_weight=1.5)

    def run(chunk_size):
        a, b = zt.clone().requires_grad_(), zs.clone().requires_grad_()
        out = soft_contrastive_loss(a, b, labels, chunk_size=chunk_size, **options)
        out.total.backward()
        return out, a.grad, b.grad

    dense, grad_t, grad_s = run(None)
    for chunk_size in (1, 5, 7, 22, 64):  # none of them divides 23
        out, chunk_grad_t, chunk_grad_s = run(chunk_size)
        for name in ("hard", "soft", "total"):
            assert getattr(out, name).item() == pytest.approx(getattr(dense, name).item(), abs=1e-5), (name, chunk_size)
        torch.testing.assert_close(chunk_grad_t, grad_t, atol=1e-5, rtol=0)
        torch.testing.assert_close(chunk_grad_s, grad_s, atol=1e-5, rtol=0)


def test_chunked_with_a_frozen_teacher_only_gives_the_student_gradient():
    zt, zs, labels = _small_batch(n=9)
    student_dense = zs.clone().requires_grad_()
    soft_contrastive_loss(zt, student_dense, labels, symmetric=True).total.backward()
    student_chunk = zs.clone().requires_grad_()
    out = soft_contrastive_loss(zt, student_chunk, labels, symmetric=True, chunk_size=2)
    out.total.backward()
    torch.testing.assert_close(student_chunk.grad, student_dense.grad, atol=1e-10, rtol=0)


def _largest_saved_tensor(fn):
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return max(sizes)


@pytest.mark.parametrize("soft_target", ["ce", "bce"])
def test_chunked_graph_keeps_no_n_by_n_tensor(soft_target):
    n = 64
    zt = torch.randn(n, 4, requires_grad=True)
    zs = torch.randn(n, 4, requires_grad=True)
    labels = (torch.rand(n, 3) < 0.5).float()
    kw = dict(soft_target=soft_target, symmetric=True)
    assert _largest_saved_tensor(lambda: soft_contrastive_loss(zt, zs, labels, **kw)) >= n * n  # the dense one does
    assert _largest_saved_tensor(lambda: soft_contrastive_loss(zt, zs, labels, chunk_size=8, **kw)) < n * n


def test_learnable_temperature_gets_a_gradient_on_the_dense_path_and_is_refused_when_chunked():
    zt, zs, labels = _small_batch()
    temperature = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    soft_contrastive_loss(zt, zs, labels, temperature=temperature).total.backward()
    assert temperature.grad is not None and temperature.grad.item() != 0.0
    with pytest.raises(DomainFMError, match="learnable temperature"):
        soft_contrastive_loss(zt, zs, labels, temperature=temperature, chunk_size=2)


def test_half_precision_embeddings_give_a_float32_loss():
    out = soft_contrastive_loss(EXAMPLE_TEACHER.bfloat16(), EXAMPLE_STUDENT.bfloat16(), EXAMPLE_LABELS)
    assert out.total.dtype == torch.float32
    assert out.hard.item() == pytest.approx(0.305073, abs=0.05)  # bf16 inputs: ~3 significant digits


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_autocast_does_not_lower_the_loss_precision(chunk_size):
    g = torch.Generator().manual_seed(5)
    zt, zs = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = (torch.rand(10, 4, generator=g) < 0.5).float()

    def run(autocast):
        a, b = zt.clone().requires_grad_(), zs.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = soft_contrastive_loss(a, b, labels, symmetric=True, chunk_size=chunk_size)
            nce = info_nce_loss(a, b, logit_scale=20.0)
        (out.total + nce).backward()  # outside autocast, as AMP (and Lightning) run it
        return out.total, nce, a.grad, b.grad

    reference, mixed = run(False), run(True)
    for got, want in zip(mixed, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(label_similarity="dice"), "unknown label similarity 'dice'.*--label-similarity"),
        (dict(soft_target="mse"), "unknown soft target 'mse'.*--soft-target"),
        (dict(chunk_size=0), "chunk size must be a positive integer.*--chunk-size"),
        (dict(temperature=0.0), "temperature must be positive.*--temperature"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(DomainFMError, match=match) as info:
        soft_contrastive_loss(EXAMPLE_TEACHER, EXAMPLE_STUDENT, EXAMPLE_LABELS, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_shapes_are_errors():
    with pytest.raises(DomainFMError, match=r"must both be \[N, D\]"):
        soft_contrastive_loss(EXAMPLE_TEACHER, EXAMPLE_STUDENT[:3], EXAMPLE_LABELS)
    with pytest.raises(DomainFMError, match=r"labels must be \[N, K\] with N = 4"):
        soft_contrastive_loss(EXAMPLE_TEACHER, EXAMPLE_STUDENT, EXAMPLE_LABELS[:3])


# ---------------------------------------------------------------------------------------------
# InfoNCE


def naive_info_nce(a, b, scale, symmetric, smoothing):
    n = len(a)
    sim = [[scale * F.cosine_similarity(a[i], b[j], dim=0) for j in range(n)] for i in range(n)]

    def direction(m):
        loss = 0.0
        for i in range(n):
            lse = torch.log(sum(torch.exp(m[i][j]) for j in range(n)))
            # smoothed target: 1 - eps on the match, eps/n spread over every class (torch's convention)
            for j in range(n):
                target = (1 - smoothing) * (i == j) + smoothing / n
                loss = loss - target * (m[i][j] - lse) / n
        return loss

    forward = direction(sim)
    if not symmetric:
        return forward
    return (forward + direction([[sim[j][i] for j in range(n)] for i in range(n)])) / 2


@pytest.mark.parametrize("symmetric,smoothing", [(True, 0.0), (False, 0.0), (True, 0.1), (False, 0.2)])
def test_info_nce_matches_a_loop_and_cross_entropy(symmetric, smoothing):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 6, generator=g, dtype=torch.float64)
    b = torch.randn(5, 6, generator=g, dtype=torch.float64)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss = info_nce_loss(a, b, logit_scale=log_scale.exp(), symmetric=symmetric, label_smoothing=smoothing)
    loss.backward()
    a_ref, b_ref = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    expected = naive_info_nce(a_ref, b_ref, ref_scale.exp(), symmetric, smoothing)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    assert log_scale.grad.item() == pytest.approx(ref_scale.grad.item(), abs=1e-10)
    # a float scale gives the same value
    assert info_nce_loss(a, b, logit_scale=1 / 0.07, symmetric=symmetric, label_smoothing=smoothing).item() == pytest.approx(
        loss.item(), abs=1e-10
    )


def test_info_nce_without_smoothing_is_torch_cross_entropy():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    logits = 10.0 * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    expected = F.cross_entropy(logits, torch.arange(8))
    assert info_nce_loss(a, b, logit_scale=10.0, symmetric=False).item() == pytest.approx(expected.item(), abs=1e-6)
    # identical pairs far apart from each other: the loss goes to 0
    eye = torch.eye(4)
    assert info_nce_loss(eye, eye, logit_scale=100.0).item() < 1e-30
    with pytest.raises(DomainFMError, match="same shape"):
        info_nce_loss(a, b[:3], logit_scale=1.0)


def test_importing_the_math_modules_imports_no_torch():
    code = "import sys, domainfm.losses, domainfm.masking, domainfm.distributed; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
