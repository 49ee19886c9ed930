"""Re-ID losses (reid-strong-baseline / NFormer recipe): label-smoothed CE, batch-hard triplet,
center loss. The triplet mining is chunked so NFormer's 2 x 7000-feature batches never build an
N x N distance matrix with autograd."""
import torch
import torch.nn.functional as F
from torch import nn

from nformer_reid.config import CENTER_WEIGHT, TRIPLET_MARGIN
from nformer_reid.utils.checks import as_float, as_int


class CrossEntropyLabelSmooth(nn.Module):
    """CE with targets (1 - eps) * onehot + eps / num_classes (Szegedy et al. 2016)."""

    def __init__(self, num_classes: int, epsilon: float = 0.1):
        super().__init__()
        self.num_classes = as_int(num_classes, "num_classes", minimum=1)
        self.epsilon = as_float(epsilon, "epsilon", minimum=0, maximum=1)

    def forward(self, logits, targets):
        log_probs = F.log_softmax(logits.float(), dim=1)
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
        return ((1 - self.epsilon) * nll - self.epsilon * log_probs.mean(1)).mean()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances, margin 0.3.

    Hardest positive / negative per anchor are mined without autograd in chunks of anchors
    (O(chunk * N) memory); the loss is then computed on the selected pairs only, which gives the
    same gradient as differentiating through the full distance matrix.
    """

    def __init__(self, margin: float = TRIPLET_MARGIN, chunk_size: int = 2048):
        super().__init__()
        self.margin = as_float(margin, "margin", minimum=0)
        self.chunk_size = as_int(chunk_size, "chunk_size", minimum=1)

    def forward(self, feats, labels):
        x = feats.float()
        with torch.no_grad():
            sq = (x * x).sum(1)
            pos_idx = torch.empty_like(labels)
            neg_idx = torch.empty_like(labels)
            for s in range(0, x.shape[0], self.chunk_size):
                d2 = sq[s:s + self.chunk_size, None] + sq[None] - 2 * x[s:s + self.chunk_size] @ x.T
                same = labels[s:s + self.chunk_size, None] == labels[None]
                pos_idx[s:s + self.chunk_size] = d2.masked_fill(~same, float("-inf")).argmax(1)
                neg_idx[s:s + self.chunk_size] = d2.masked_fill(same, float("inf")).argmin(1)
            has_neg = (labels[neg_idx] != labels)
        dist_ap = ((x - x[pos_idx]).pow(2).sum(1)).clamp(min=1e-12).sqrt()
        dist_an = ((x - x[neg_idx]).pow(2).sum(1)).clamp(min=1e-12).sqrt()
        loss = F.relu(dist_ap - dist_an + self.margin)
        return torch.where(has_neg, loss, torch.zeros_like(loss)).mean()


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): sum_i ||x_i - c_{y_i}||^2 / batch size.

    The centers are trained by their own SGD (lr 0.5 in the recipe) with gradients rescaled by
    1 / loss weight, as reid-strong-baseline does (see solver.step_center_optimizer)."""

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        num_classes, feat_dim = as_int(num_classes, "num_classes", minimum=1), as_int(feat_dim, "feat_dim", minimum=1)
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, feats, labels):
        diff = feats.float() - self.centers[labels]
        return diff.pow(2).sum(1).clamp(min=1e-12, max=1e12).sum() / feats.shape[0]


class ReIDLoss(nn.Module):
    """label-smoothed CE(logits) + triplet(feat) + center_weight * center(feat); returns (total, parts)."""

    def __init__(self, num_classes: int, feat_dim: int, margin: float = TRIPLET_MARGIN,
                 center_weight: float = CENTER_WEIGHT, label_smooth: float = 0.1):
        super().__init__()
        self.xent = CrossEntropyLabelSmooth(num_classes, label_smooth)
        self.triplet = TripletLoss(margin)
        self.center = CenterLoss(num_classes, feat_dim)
        self.center_weight = as_float(center_weight, "center_weight", minimum=0, open_min=True)

    def forward(self, logits, feats, labels):
        parts = {"ce": self.xent(logits, labels), "triplet": self.triplet(feats, labels),
                 "center": self.center(feats, labels)}
        total = parts["ce"] + parts["triplet"] + self.center_weight * parts["center"]
        return total, {k: float(v.detach()) for k, v in parts.items()}
