"""Evaluate a pre-trained run (METHOD.md, "Evaluation"): transfer to UCF101 / HMDB51 by retrieval,
fine-tuning and a linear probe; per-class R@1 and top-4 retrievals on the pre-training set; and
faulty-positive detection against the injected (and, on the embedded data, natural) faulty pairs.

    python evaluate.py runs/default                 # the embedded downstream sets, fold 1
    python evaluate.py runs/k400/checkpoint.pt --ucf-root UCF-101 --ucf-splits ucfTrainTestlist \\
        --hmdb-root hmdb51 --hmdb-splits testTrainMulti_7030_splits --fold 1

Prints a table and merges everything into RUN_DIR/results.json (plots.py reads it).
"""
import argparse
import copy
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import data
import distributed
import embedded_dataset
import listings
import runs
from losses import faulty_positive_weights, gather_from_all_ranks
from model import AVModel
from runs import progress


# ----------------------------------------------------------------------------------------------
# Metrics (pure functions, tested on hand-made inputs)
# ----------------------------------------------------------------------------------------------
def recall_at_k(query, gallery, query_labels, gallery_labels, ks=(1, 5, 10, 20), device=None):
    """R@K: the share of queries with at least one same-class item among their K nearest gallery
    items (Euclidean distance; the search on `device`)."""
    nearest = nearest_neighbours(query, gallery, min(max(ks), gallery.shape[0]), device=device)
    hit = gallery_labels[nearest] == query_labels[:, None]                     # both (Q, K)
    return {f"R@{k}": hit[:, :k].any(1).float().mean().item() for k in ks if k <= gallery.shape[0]}


def nearest_neighbours(query, gallery, k, chunk=None, device=None):
    """Indices (Q, k) of the k nearest gallery items of each query (Euclidean), on the CPU. The
    search runs on `device` (default: the gallery's), a chunk of queries at a time, at most ~2^26
    distances (256 MB): 20k Kinetics val queries against 240k training videos at once need 19 GB."""
    gallery = gallery.to(device or gallery.device, torch.float32)
    chunk = chunk or max(1, 2**26 // max(len(gallery), 1))
    return torch.cat([torch.cdist(q.to(gallery.device, torch.float32), gallery)
                      .topk(k, dim=1, largest=False).indices.cpu() for q in query.split(chunk)])


def per_class_recall_at_1(query, gallery, query_labels, gallery_labels, classes, device=None):
    """R@1 averaged over the queries of each class (Figure 3)."""
    hit = (gallery_labels[nearest_neighbours(query, gallery, 1, device=device)[:, 0]]
           == query_labels).float()
    return {classes[c]: hit[query_labels == c].mean().item()
            for c in query_labels.unique().tolist()}


def clip_and_video_top1(clip_logits, labels):
    """clip_logits (N, n_clips, C): clip-level top-1 (every clip on its own) and video-level top-1
    (the mean softmax over a video's clips, then the argmax)."""
    clip = (clip_logits.argmax(-1) == labels[:, None]).float().mean().item()
    video = (clip_logits.softmax(-1).mean(1).argmax(-1) == labels).float().mean().item()
    return clip, video


def roc_auc(score, positive):
    """ROC AUC of `score` for detecting `positive` (Mann-Whitney U statistic, ties averaged)."""
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]                 # average rank of ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_metrics(s, faulty, ignore=None):
    """How well low alignment s_i = v̄_i·ā_i finds the faulty pairs: ROC AUC of -s, and the
    precision of the n lowest-scored instances with n = number of faulty pairs (precision at n₀·N).
    `ignore`: instances scored neither as faulty nor as clean (faulty pairs of another kind)."""
    s, faulty = np.asarray(s, dtype=np.float64), np.asarray(faulty, dtype=bool)
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        s, faulty = s[keep], faulty[keep]
    n = int(faulty.sum())
    lowest = np.argsort(s, kind="stable")[:n]
    return {"auc": roc_auc(-s, faulty),
            "precision_at_n": float(faulty[lowest].mean()) if n else float("nan"),
            "n_faulty": n, "n_scored": len(s), "chance": n / max(len(s), 1)}


def detection_report(s, injected, natural=None):
    """detection_metrics of the injected pairs and, where the data marks them (the embedded set's
    annotations.csv), of the natural faulty pairs that were not injected; only the sets present.
    Each kind is scored against the clean pairs alone: finding a pair of the other kind is neither a
    hit nor a false alarm."""
    natural = None if natural is None else natural & ~injected
    report = {}
    if injected.any():
        report["injected"] = detection_metrics(s, injected, ignore=natural)
    if natural is not None and natural.any():
        report["natural"] = detection_metrics(s, natural, ignore=injected)
    return report


def bank_detection(criterion, injected, natural):
    """The weights W(s) of every bank slot under the current μ, σ, and how well the scores s_i
    find the faulty pairs (logged every epoch by train.py)."""
    bank = criterion.bank
    mu, sigma = bank.score_stats()
    w = faulty_positive_weights(bank.s, mu, sigma, criterion.delta, criterion.kappa,
                                criterion.w_min)
    stats = {"mu": mu.item(), "sigma": sigma.item(), "w_mean": w.mean().item(),
             "smallest_weight": w.min().item(),
             "w_share_below_half": (w < 0.5).float().mean().item()}
    for name, d in detection_report(bank.s.cpu().numpy(), injected, natural).items():
        stats.update({f"{name}_{k}": v for k, v in d.items()})
    return stats


def soft_target_mass_in_class(diag, index, labels):
    """Of the target mass Soft-xID moves off the positive, the share that lands on same-class
    negatives (faulty negatives found), and the share of same-class negatives (chance)."""
    same = labels[diag["negatives"]][None, :] == labels[index][:, None]          # (B, K)
    moved = diag["targets_v"][:, 1:] + diag["targets_a"][:, 1:]                   # (B, K)
    total = moved.sum()
    share = ((moved * same).sum() / total).item() if total > 0 else float("nan")
    return share, same.float().mean().item()


def chance_r1(gallery_labels, query_labels):
    """Expected R@1 of random features: the share of gallery items of the query's class."""
    counts = torch.bincount(gallery_labels, minlength=int(query_labels.max()) + 1).float()
    return (counts / len(gallery_labels))[query_labels].mean().item()


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
@dataclass
class VideoFeatures:
    features: dict        # {"pooled": (N, D), "map": (N, D')}, averaged over each video's clips
    labels: torch.Tensor  # (N,)
    index: torch.Tensor   # (N,) each row's position in the dataset (a video that failed is missing)
    errors: list          # the failures, named


@torch.no_grad()
def extract_video_features(model, dataset, device, batch_size=16, workers=0,
                           kinds=("pooled", "map"), rank=0, world=1, desc="features"):
    """Per video, the encoder's features (eval mode gives video (n, 3, T, H, W): n clips, averaged).
    A video that fails to decode is named in errors and left out, never replaced. With world > 1,
    each rank extracts every world-th video and all ranks get the whole result, in dataset order."""
    model.eval()
    transforms = data.BatchTransforms(dataset.spec, train=False).to(device)
    share = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(share, batch_size=batch_size, num_workers=workers,
                        collate_fn=data.collate_clips)
    feats, labels, kept, errors = {k: [] for k in kinds}, [], [], []
    for batch in progress(loader, desc=desc, unit="batch", disable=rank != 0, leave=False):
        errors += batch["errors"]
        if "video" not in batch:
            continue
        video = transforms.video(batch["video"].to(device, non_blocking=True))  # (B, n, 3, T, H, W)
        b, n = video.shape[:2]
        for kind, f in model.video_features(video.flatten(0, 1)).items():      # (B*n, D)
            if kind in kinds:  # held on the CPU: 240k x 8192 floats are 7.9 GB
                feats[kind].append(f.float().view(b, n, -1).mean(1).cpu())
        labels.append(batch["label"])
        kept.append(batch["index"])
    if not kept:  # nothing decoded in this share: empty rows of the right width (ranks gather them)
        spec = dataset.spec
        blank = model.video_features(torch.zeros(1, 3, spec.frames, spec.size, spec.size,
                                                 device=device))
        feats = {k: [blank[k].float()[:0].cpu()] for k in kinds}
        labels, kept = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    feats, labels, kept = ({k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels),
                           torch.cat(kept))
    if world > 1:  # the collectives run on the device (NCCL); the result comes back to the CPU
        feats = {k: gather_from_all_ranks(v.to(device)).cpu() for k, v in feats.items()}
        labels, kept = (gather_from_all_ranks(t.to(device)).cpu() for t in (labels, kept))
        errors = [e for share_errors in distributed.gather_objects(errors, world)
                  for e in share_errors]
        order = kept.argsort()
        feats, labels, kept = {k: v[order] for k, v in feats.items()}, labels[order], kept[order]
    return VideoFeatures(feats, labels, kept, errors)


# ----------------------------------------------------------------------------------------------
# Transfer: linear probe and fine-tuning
# ----------------------------------------------------------------------------------------------
def linear_probe(train_x, train_y, test_x, test_y, num_classes, steps=300):
    """A linear classifier on frozen, standardised video features (full-batch Adam). Video top-1."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    clf = nn.Linear(train_x.shape[1], num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(clf((train_x - mean) / std), train_y).backward()
        opt.step()
    with torch.no_grad():
        return (clf((test_x - mean) / std).argmax(1) == test_y).float().mean().item()


class Classifier(nn.Module):
    """The pre-trained video encoder + dropout 0.5 + a linear layer (the fine-tuning protocol)."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder, self.dropout, self.fc = (encoder, nn.Dropout(0.5),
                                               nn.Linear(encoder.dim, num_classes))

    def forward(self, video):                                                   # (B, 3, T, H, W)
        return self.fc(self.dropout(self.encoder.feature_map(video).mean(dim=(2, 3, 4))))  # (B, C)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(model, train_set, test_set, num_classes, device, epochs, lr, batch_size, workers,
             schedule="cosine"):
    """Train a Classifier on random clips, then score 10-clip videos: (clip top-1, video top-1)."""
    net = Classifier(copy.deepcopy(model.video), num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=data.collate_clips, drop_last=len(train_set) > batch_size)
    # the learning rate decays to 0 over the run: the last step's weights are the ones scored, and
    # at a constant rate they are one noisy iterate among many
    decay = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
             if schedule == "cosine" else None)
    train_tf = data.BatchTransforms(train_set.spec, train=True).to(device)
    test_tf = data.BatchTransforms(test_set.spec, train=False).to(device)
    bar = progress(total=epochs * len(loader), desc="fine-tuning", unit="step", leave=False)
    for _ in range(epochs):
        net.train()
        for batch in loader:
            bar.update()
            if "video" not in batch:
                continue
            video = train_tf.video(batch["video"].to(device), batch["jitter"])
            loss = nn.functional.cross_entropy(net(video), batch["label"].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if decay:
                decay.step()
    bar.close()
    net.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in progress(DataLoader(test_set, batch_size=8, num_workers=workers,
                                         collate_fn=data.collate_clips),
                              desc="fine-tuned, testing", unit="batch", leave=False):
            if "video" not in batch:
                continue
            video = test_tf.video(batch["video"].to(device))                    # (B, n, 3, T, H, W)
            logits.append(net(video.flatten(0, 1)).view(*video.shape[:2], -1).cpu())
            labels.append(batch["label"])
    return clip_and_video_top1(torch.cat(logits), torch.cat(labels))


def evaluate_downstream(name, model, listing, spec, args, device, log):
    """Retrieval (test queries, train gallery), linear probe and fine-tuning on one labelled set."""
    (train_v, classes), (test_v, _) = listing("train"), listing("test")
    (train_v, broken_train), (test_v, broken_test) = (
        listings.scan(vs, spec, name=f"{name} [{split}]", log=log)
        for vs, split in ((train_v, "train"), (test_v, "test")))
    broken = broken_train + broken_test
    for path, reason in broken[:20]:
        log(f"  {name}: left out {path} ({reason})")
    if len(broken) > 20:
        log(f"  {name}: ... and {len(broken) - 20} more, all listed in results.json")
    t = time.perf_counter()
    gallery = extract_video_features(model, data.AVClips(train_v, spec, False, args.clips), device,
                                     workers=args.workers, desc=f"{name} train features")
    queries = extract_video_features(model, data.AVClips(test_v, spec, False, args.clips), device,
                                     workers=args.workers, desc=f"{name} test features")
    for e in gallery.errors + queries.errors:
        log(f"data error ({name} video left out): {e}")
    kind = args.retrieval_features
    out = {"train_videos": len(gallery.labels), "test_videos": len(queries.labels),
           "classes": len(classes), "broken": [f"{p}\t{r}" for p, r in broken],
           "data_errors": gallery.errors + queries.errors,
           "retrieval": recall_at_k(queries.features[kind], gallery.features[kind], queries.labels,
                                    gallery.labels, device=device),
           "linear_probe_video_top1": linear_probe(gallery.features["pooled"], gallery.labels,
                                                   queries.features["pooled"], queries.labels,
                                                   len(classes))}
    clips, videos = [], []
    for r in range(args.ft_repeats):  # fine-tuning is the noisy number: report its mean
        seed_everything(args.seed * 1000 + r)
        clip, video = finetune(model, data.AVClips(train_v, spec, True),
                               data.AVClips(test_v, spec, False, args.clips), len(classes), device,
                               args.ft_epochs, args.ft_lr, args.ft_batch_size, args.workers,
                               args.ft_schedule)
        clips.append(clip)
        videos.append(video)
    out.update(finetune_clip_top1=float(np.mean(clips)), finetune_video_top1=float(np.mean(videos)),
               finetune_video_top1_each=videos, seconds=time.perf_counter() - t)
    return out


# ----------------------------------------------------------------------------------------------
# The pre-training set: per-class R@1, top-4 retrievals, detection
# ----------------------------------------------------------------------------------------------
def training_instances(ckpt):
    """The run's instances, bank slot by bank slot, exactly as it trained on them (never a
    re-listing, which could differ: files added, removed, or scanned with other requirements)."""
    return [data.Video(path, label, duration) for path, label, duration in ckpt["instances"]]


def pretraining_root(run_args):
    """Where a run's pre-training splits are: --data-root, or the embedded dataset's kinetics/."""
    return (Path(run_args["data_root"]) if run_args["data_root"]
            else Path(run_args["embedded_root"]) / "kinetics")


def pretraining_set_features(model, train_v, val_v, spec, device, workers, log,
                             kinds=("pooled", "map"), rank=0, world=1):
    """(gallery, queries): features of the training videos and of the held-out ones, 2 clips each,
    failures named; (None, None) when either set has no video that decodes. Shared out over the
    ranks of a multi-GPU run (train.py's end-of-run summary)."""
    gallery, queries = (
        extract_video_features(model, data.AVClips(videos, spec, False, num_clips=2), device,
                               workers=workers, kinds=kinds, rank=rank, world=world, desc=desc)
        for videos, desc in ((train_v, "training-set features"), (val_v, "held-out features")))
    for name, part in (("training", gallery), ("held-out", queries)):
        for e in part.errors:
            log(f"data error ({name} video left out of the pre-training-set retrieval): {e}")
    if not len(gallery.labels) or not len(queries.labels):  # the same on every rank (gathered)
        log("pre-training set: no training or held-out video decoded, so no retrieval")
        return None, None
    return gallery, queries


def run_summary(model, criterion, train_v, val_v, spec, device, workers, injected, natural, log,
                rank=0, world=1, names=("train", "val")):
    """train.py's end-of-run summary: video retrieval of the held-out clips among the training
    clips (val_v None: none), and faulty-positive detection by the bank's scores. Each rank
    extracts the features of its share of the videos (2 clips a video: at Kinetics scale that is
    the summary's cost); rank 0 searches the nearest neighbours on the training device, in chunks
    of queries. Returns the results on rank 0, {} elsewhere."""
    results = {}
    if val_v:
        gallery, queries = pretraining_set_features(model, train_v, val_v, spec, device, workers,
                                                    log, kinds=("pooled",), rank=rank, world=world)
        if gallery is not None and rank == 0:
            r = recall_at_k(queries.features["pooled"], gallery.features["pooled"], queries.labels,
                            gallery.labels, ks=(1, 5), device=device)
            results["train_summary_retrieval"] = r
            log(f"video retrieval, {len(queries.labels)} held-out {names[1]} clips -> "
                f"{len(gallery.labels)} {names[0]} clips: "
                + "  ".join(f"{k} {v:.3f}" for k, v in r.items())
                + f"  (chance R@1 ~ {chance_r1(gallery.labels, queries.labels):.3f})")
    if rank != 0:
        return results
    for name, d in detection_report(criterion.bank.s.cpu().numpy(), injected, natural).items():
        results[f"detection_{name}"] = d
        log(f"{name} faulty positives ({d['n_faulty']}"
            + (", marked in annotations.csv" if name == "natural" else "")
            + f"): ROC AUC {d['auc']:.3f}, precision of the {d['n_faulty']} lowest-scored "
            f"{d['precision_at_n']:.3f} (chance {d['chance']:.3f})")
    return results


def pretraining_analysis(model, ckpt, spec, args, device, out_dir, log):
    run_args = ckpt["args"]
    classes = ckpt["classes"]
    train_v = training_instances(ckpt)
    results = {}
    results.update(retrieval_on_pretraining_set(model, run_args, classes, train_v, spec, args,
                                                device, out_dir, log))

    # faulty-positive detection from the bank's alignment scores
    s = ckpt["criterion"]["bank.s"].cpu().numpy()
    injected = data.injected_mask(ckpt["injected_pairs"], len(s))
    audio_from = dict(ckpt["injected_pairs"])
    natural = embedded_dataset.natural_faulty_flags(train_v)
    results.update({f"detection_{name}": d
                    for name, d in detection_report(s, injected, natural).items()})
    results["most_likely_faulty"] = [
        {"instance": int(i), "video": train_v[i].path,
         "audio_from": train_v[audio_from.get(int(i), int(i))].path, "s": float(s[i]),
         "injected": bool(injected[i]),
         "natural": bool(natural[i]) if natural is not None else None}
        for i in np.argsort(s, kind="stable")[:100]]
    return results


def retrieval_on_pretraining_set(model, run_args, classes, train_v, spec, args, device,
                                 out_dir, log):
    """R@K and per-class R@1 of held-out clips among the training clips (labels of the training
    classes), and the top-4 retrievals of one query per class with a frame of each video (Figure 4).
    Empty when the held-out split is not there."""
    try:
        val_v, _, _ = listings.pretraining_split(pretraining_root(run_args), run_args["val_split"],
                                                 spec, run_args.get("val_csv") or run_args["csv"],
                                                 seed=run_args["seed"], classes=classes, log=log)
    except (FileNotFoundError, ValueError) as e:  # no such split, nothing usable in it, a bad CSV
        log(f"pre-training set: no held-out videos, so no retrieval, per-class R@1 or Figure 4 "
            f"({e})")
        return {}
    kind = args.retrieval_features  # only that kind is kept: "map" of 240k videos is 7.9 GB
    gallery, queries = pretraining_set_features(model, train_v, val_v, spec, device, args.workers,
                                                log, kinds=(kind,))
    if gallery is None:
        return {}
    qry, gal = queries.features[kind], gallery.features[kind]
    results = {"pretrain_retrieval": recall_at_k(qry, gal, queries.labels, gallery.labels,
                                                 device=device),
               "per_class_R@1": per_class_recall_at_1(qry, gal, queries.labels, gallery.labels,
                                                      classes, device)}
    first_of_class = {}
    for row, y in enumerate(queries.labels.tolist()):
        first_of_class.setdefault(y, row)
    rows = list(first_of_class.values())[: args.queries]
    nn_idx = nearest_neighbours(qry[rows], gal, min(4, len(gal)), device=device)
    frame_spec = data.ClipSpec(frames=1, fps=1.0, need_audio=False)
    grid, listing = [], []
    for r, neighbours in zip(rows, nn_idx.tolist()):
        items = ([val_v[int(queries.index[r])]]
                 + [train_v[int(gallery.index[n])] for n in neighbours])
        grid.append([middle_frame(v, frame_spec, log) for v in items])
        listing.append([{"path": v.path, "class": classes[v.label]} for v in items])
    np.savez_compressed(out_dir / "retrievals.npz", frames=np.array(grid, dtype=np.uint8))
    results["top4_retrievals"] = listing
    return results


def middle_frame(video, spec, log=print):
    """The middle frame of a video, centre-cropped and resized to 112x112 for the retrieval figure
    (a grey frame, and a message, for a video that fails to decode now)."""
    try:
        frames, _ = data.decode_clip(video.path, video.duration / 2, replace(spec, size=112),
                                     box=data.centre_box)
    except data.ClipError as e:
        log(f"data error (Figure 4 shows a grey frame): {e}")
        return np.full((112, 112, 3), 128, np.uint8)
    return frames[0]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def load_run(path, device):
    """A run folder or a checkpoint file -> (model, checkpoint, run folder)."""
    path = Path(path)
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    if not ckpt_path.is_file():
        raise SystemExit(f"evaluate.py: no checkpoint at {ckpt_path} (give a run folder written "
                         f"by train.py, or its checkpoint.pt)")
    ckpt = runs.load_checkpoint(ckpt_path)
    run_args = ckpt["args"]
    if "embedded_root" not in run_args:
        raise SystemExit(f"evaluate.py: {ckpt_path} was written by a train.py older than this one "
                         f"(its flags lack --embedded-root); train it again with this code")
    model = AVModel(run_args["video_arch"], run_args["audio_arch"],
                    centred_heads=run_args["centred_heads"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SystemExit(f"evaluate.py: {ckpt_path} does not fit the architecture it records "
                         f"(--video-arch {run_args['video_arch']}, "
                         f"--audio-arch {run_args['audio_arch']}): {str(e)[:300]}")
    return model.to(device), ckpt, ckpt_path.parent


def protocol(args):
    """What the downstream numbers depend on besides the checkpoint: a sweep re-evaluates a point
    whose results.json was made under another protocol (and trains nothing again)."""
    # workers too: which worker draws a clip's random crop depends on their number; the roots
    # say which sets were evaluated (None: the embedded stand-ins)
    return {k: getattr(args, k) for k in ("fold", "clips", "retrieval_features", "seed",
                                         "ft_epochs", "ft_lr", "ft_schedule", "ft_batch_size",
                                         "ft_repeats", "workers", "ucf_root", "hmdb_root")}


def parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder of train.py, or a checkpoint.pt")
    p.add_argument("--ucf-root",
                   help="UCF101 videos (UCF-101/<class>/*.avi); default: the embedded stand-in")
    p.add_argument("--ucf-splits",
                   help="ucfTrainTestlist folder (classInd.txt, trainlist0F.txt, testlist0F.txt)")
    p.add_argument("--hmdb-root",
                   help="HMDB51 videos (<class>/*.avi); default: the embedded stand-in")
    p.add_argument("--hmdb-splits", help="folder of <class>_test_split<F>.txt files")
    p.add_argument("--fold", type=int, default=1, choices=[1, 2, 3],
                   help="official split (fold) to use")
    p.add_argument("--clips", type=int, default=10,
                   help="uniformly spaced clips per test video (protocol: 10)")
    p.add_argument("--retrieval-features", choices=["map", "pooled"], default="map",
                   help="map: last layer pooled to 4x4 and flattened (the supplement's); pooled: "
                        "global average")
    p.add_argument("--ft-epochs", type=int, default=5,
                   help="fine-tuning epochs (the embedded sets need few)")
    p.add_argument("--ft-lr", type=float, default=1e-3,
                   help="fine-tuning learning rate (Adam), the start of --ft-schedule")
    p.add_argument("--ft-schedule", choices=["cosine", "constant"], default="cosine",
                   help="fine-tuning learning rate over the steps: cosine decays it to 0, so that "
                        "the scored weights are not one noisy iterate of many")
    p.add_argument("--ft-batch-size", type=int, default=16, help="fine-tuning clips per step")
    p.add_argument("--queries", type=int, default=8,
                   help="query videos in the top-4 retrieval grid")
    p.add_argument("--skip", nargs="*", default=[], choices=["ucf", "hmdb", "pretrain"],
                   help="parts to skip")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds fine-tuning and augmentation: same seed, same numbers")
    p.add_argument("--ft-repeats", type=int, default=1,
                   help="fine-tune this many times (seeds seed*1000 + r) and report the mean: "
                        "one fine-tuning on a small labelled set is noisy (RESULTS.md)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if (bool(args.ucf_root) != bool(args.ucf_splits)
            or bool(args.hmdb_root) != bool(args.hmdb_splits)):
        p.error("give --ucf-root with --ucf-splits, and --hmdb-root with --hmdb-splits")
    if args.ft_repeats < 1:
        p.error(f"--ft-repeats must be >= 1, got {args.ft_repeats}")
    for flag in ("ucf_root", "ucf_splits", "hmdb_root", "hmdb_splits"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_dir():
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not a folder")

    t0 = time.perf_counter()
    seed_everything(args.seed)
    device = torch.device(args.device)
    model, ckpt, run_dir = load_run(args.run, device)
    run_args = ckpt["args"]
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    spec = data.ClipSpec(frames=run_args["frames"], fps=run_args["fps"], size=run_args["crop"],
                         need_audio=False)
    embedded = Path(run_args["embedded_root"])
    # the embedded data this evaluation reads, written on first use: the UCF / HMDB stand-ins that
    # stand in for sets not given, and the pre-training set of a run trained on it
    stand_ins = [n for n in ("ucf", "hmdb")
                 if n not in args.skip and not getattr(args, f"{n}_root")]
    if stand_ins or ("pretrain" not in args.skip and not run_args.get("data_root")):
        embedded_dataset.ensure(embedded, downstream=bool(stand_ins), log=log)
    sets = {"ucf": (lambda split: listings.ucf101(args.ucf_root, args.ucf_splits, args.fold, split))
                   if args.ucf_root else
                   (lambda split: embedded_dataset.splits(embedded)["ucf"](split, args.fold)),
            "hmdb": (lambda split: listings.hmdb51(args.hmdb_root, args.hmdb_splits, args.fold, split))
                    if args.hmdb_root else
                    (lambda split: embedded_dataset.splits(embedded)["hmdb"](split, args.fold))}
    results = {}
    downstream = [name for name in sets if name not in args.skip]
    if downstream:  # what the downstream numbers are of; None unless this call (re)makes them all,
        whole = len(downstream) == len(sets)  # so that no older number carries this epoch's label
        results.update(evaluated_epoch=ckpt["epoch"] + 1 if whole else None,
                       protocol=protocol(args) if whole else None,
                       fold=args.fold if whole else None,
                       retrieval_features=args.retrieval_features if whole else None,
                       eval_seed=args.seed if whole else None)
    if "pretrain" not in args.skip:
        results["pretrain_evaluated_epoch"] = ckpt["epoch"] + 1
    for name, listing in sets.items():
        if name not in args.skip:
            results[name] = evaluate_downstream(name, model, listing, spec, args, device, log)
    if "pretrain" not in args.skip:
        results.update(pretraining_analysis(model, ckpt, spec, args, device, run_dir, log))
    results["evaluate_seconds"] = time.perf_counter() - t0

    path = runs.merge_results(run_dir, results)
    print_table(results)
    log(f"evaluated in {results['evaluate_seconds']:.0f}s; results merged into {path}")
    return results


def print_table(r):
    print(f"\n{'set':<6} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'R@20':>6} {'probe':>7} "
          f"{'ft clip':>8} {'ft video':>9}")
    for name in ("ucf", "hmdb"):
        if name in r:
            x, ret = r[name], r[name]["retrieval"]
            print(f"{name:<6} " + " ".join(f"{ret.get(k, float('nan')):6.3f}"
                                           for k in ("R@1", "R@5", "R@10", "R@20"))
                  + f" {x['linear_probe_video_top1']:7.3f} {x['finetune_clip_top1']:8.3f}"
                  f" {x['finetune_video_top1']:9.3f}")
    print("R@K: test videos query train videos (same class among the K nearest); probe: "
          "frozen-encoder linear\nclassifier, video top-1; ft clip / ft video: fine-tuned, top-1 "
          "of single clips / of the mean\nsoftmax over each video's clips (the protocol's number).")
    if "pretrain_retrieval" in r:
        print("pre-training set, val -> train: "
              + "  ".join(f"{k} {v:.3f}" for k, v in r["pretrain_retrieval"].items()))
    for key, what in (("detection_injected", "injected"), ("detection_natural", "natural")):
        if key in r:
            d = r[key]
            print(f"{what} faulty positives ({d['n_faulty']}): ROC AUC {d['auc']:.3f}, "
                  f"precision at n {d['precision_at_n']:.3f}")
    if "most_likely_faulty" in r:
        top = r["most_likely_faulty"]
        injected, natural = (sum(x["injected"] for x in top),
                             sum(bool(x["natural"]) and not x["injected"] for x in top))
        marks = top and top[0]["natural"] is not None
        print(f"of the {len(top)} most likely faulty pairs: {injected} injected"
              + (f", {natural} natural (marked in annotations.csv), "
                 f"{len(top) - injected - natural} clean" if marks
                 else f", {len(top) - injected} not injected"
                      " (this data marks no natural faulty pairs)"))


if __name__ == "__main__":
    main(sys.argv[1:])
