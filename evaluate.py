"""Evaluation: retrieval R@K from video features, and faulty-positive detection from the bank scores.

The protocols are in METHOD.md ("Evaluation"). train.py calls these to print what a run learned.
"""
import numpy as np
import torch
from torch.utils.data import DataLoader

from data import collate_clips


@torch.no_grad()
def extract_video_features(model, dataset, device, batch_size=32, kind="pooled", workers=0):
    """One feature per video: the mean over the dataset's clips (eval mode: video (n, 3, T, H, W)).
    Returns features (N, D), labels (N,), and the names of videos that failed to decode (their
    rows are left out; `kept` gives the indices that remain)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_clips)
    feats, labels, kept, errors = [], [], [], []
    for batch in loader:
        errors += batch["errors"]
        if "video" not in batch:
            continue
        video = batch["video"].to(device, non_blocking=True)               # (B, n, 3, T, H, W)
        b, n = video.shape[:2]
        f = model.video_features(video.flatten(0, 1), kind).float()        # (B*n, D)
        feats.append(f.view(b, n, -1).mean(1).cpu())
        labels.append(batch["label"])
        kept.append(batch["index"])
    return torch.cat(feats), torch.cat(labels), torch.cat(kept), errors


def recall_at_k(query, gallery, query_labels, gallery_labels, ks=(1, 5, 10, 20)):
    """R@K: the share of queries with at least one same-class item among their K nearest gallery
    items (Euclidean distance)."""
    dist = torch.cdist(query.float(), gallery.float())                     # (Q, G)
    k_max = min(max(ks), gallery.shape[0])
    nearest = dist.topk(k_max, dim=1, largest=False).indices               # (Q, K)
    hit = gallery_labels[nearest] == query_labels[:, None]                 # (Q, K)
    return {f"R@{k}": hit[:, :k].any(1).float().mean().item() for k in ks if k <= k_max}


def roc_auc(score, positive):
    """Area under the ROC curve of `score` for detecting `positive` (Mann-Whitney U, ties averaged)."""
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]                     # average rank of ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_metrics(s, faulty):
    """How well low alignment s_i = v̄_i·ā_i finds the faulty pairs: ROC AUC of -s, and the precision
    of the n lowest-scored instances with n = number of faulty pairs (precision at n₀·N)."""
    s, faulty = np.asarray(s, dtype=np.float64), np.asarray(faulty, dtype=bool)
    n = int(faulty.sum())
    lowest = np.argsort(s, kind="stable")[:n]
    return {"auc": roc_auc(-s, faulty), "precision_at_n": float(faulty[lowest].mean()) if n else float("nan"),
            "n_faulty": n}
