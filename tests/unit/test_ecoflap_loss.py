"""ECoFLaP's CLIP loss (`ecoflap_loss.Contrastive`) against slow loops: dense ties are positives, else plain CLIP."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sparsify.allocators.ecoflap_loss import TIE, Contrastive


def _out(img: torch.Tensor, txt: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(image_embeds=img, text_embeds=txt)


def _dense_logits(img, txt, scale):
    return [[scale * float(torch.dot(img[i] / img[i].norm(), txt[j] / txt[j].norm())) for j in range(len(txt))]
            for i in range(len(img))]


def _slow_loss(logits, dense):
    """Mean over both directions of -sum_j t_ij log softmax(l_i)_j, t uniform over the j within TIE of the own pair."""
    n = len(logits)

    def direction(lg, dn):
        total = 0.0
        for i in range(n):
            pos = [j for j in range(n) if dn[i][j] >= dn[i][i] - TIE]
            lse = math.log(sum(math.exp(v) for v in lg[i]))
            total += -sum(lg[i][j] - lse for j in pos) / len(pos)
        return total / n

    tr = lambda m: [[m[j][i] for j in range(n)] for i in range(n)]  # noqa: E731
    return (direction(logits, dense) + direction(tr(logits), tr(dense))) / 2


def test_clip_loss_counts_dense_ties_as_positives():
    """Caption 1 duplicates caption 0 and image 4 duplicates image 3 in the dense model: both count as positives."""
    g = torch.Generator().manual_seed(0)
    n, d, scale = 6, 16, 20.0
    img, txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    txt[1] = txt[0] + 1e-3 * torch.randn(d, generator=g)
    img[4] = img[3] + 1e-3 * torch.randn(d, generator=g)
    obj = Contrastive()
    obj.scale = torch.tensor(scale)
    dense = torch.tensor(_dense_logits(img, txt, scale))
    moved_img = img + 0.3 * torch.randn(n, d, generator=g)  # the "perturbed" model's outputs
    moved_txt = txt + 0.3 * torch.randn(n, d, generator=g)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 3, 4, 0])  # two units: all six rows, then rows 3, 4, 0
    out = _out(torch.cat([moved_img, moved_img[[3, 4, 0]]]), torch.cat([moved_txt, moved_txt[[3, 4, 0]]]))
    got = obj.losses(out, {}, dense, [(0, 6), (6, 9)], rows)
    want_all = _slow_loss(_dense_logits(moved_img, moved_txt, scale), dense.tolist())
    sub = [3, 4, 0]
    want_sub = _slow_loss(_dense_logits(moved_img[sub], moved_txt[sub], scale), dense[sub][:, sub].tolist())
    assert got.tolist() == pytest.approx([want_all, want_sub], rel=1e-5)
    assert int((dense >= dense.diagonal()[:, None] - TIE).sum()) > n  # the ties are there: the test can fail


def test_clip_loss_without_ties_is_the_plain_clip_loss():
    """Well-separated dense pairs: the loss is CLIP's (diagonal targets, both directions)."""
    g = torch.Generator().manual_seed(1)
    n, d, scale = 5, 32, 50.0
    img = torch.eye(n, d) + 0.05 * torch.randn(n, d, generator=g)
    txt = torch.eye(n, d) + 0.05 * torch.randn(n, d, generator=g)
    obj = Contrastive()
    obj.scale = torch.tensor(scale)
    dense = torch.tensor(_dense_logits(img, txt, scale))
    assert int((dense >= dense.diagonal()[:, None] - TIE).sum()) == n
    moved_img, moved_txt = img + 0.2 * torch.randn(n, d, generator=g), txt + 0.2 * torch.randn(n, d, generator=g)
    got = obj.losses(_out(moved_img, moved_txt), {}, dense, [(0, n)], torch.arange(n))
    logits = _dense_logits(moved_img, moved_txt, scale)
    plain = 0.0
    for i in range(n):
        plain -= logits[i][i] - math.log(sum(math.exp(v) for v in logits[i]))  # image -> text
        plain -= logits[i][i] - math.log(sum(math.exp(logits[j][i]) for j in range(n)))  # text -> image
    assert float(got[0]) == pytest.approx(plain / (2 * n), rel=1e-5)
