"""Pre-train video and audio encoders with xID, Weighted-xID, Soft-xID or Robust-xID.

    python train.py                                   # embedded dataset, small encoders, Robust-xID (CPU ok)
    python train.py --n0 0.3 --mode weighted          # inject 30% faulty positives, down-weight them
    torchrun --nproc_per_node=8 train.py --data-root /data/kinetics --video-arch r2plus1d_18 \\
        --audio-arch avid --crop 112 --fps 16 --audio-seconds 2 --sample-rate 24000 --lr 2e-4 --batch-size 256 \\
        --bank-refresh step --no-centred-heads --bank-init random   # the paper's recipe (this project's
                                                        # start, centred heads and a filled bank, without the last two)

One folder per run (--out): args.json, log.jsonl, injection.json, broken.txt, checkpoint.pt, results.json.
"""
import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import data
import distributed
import embedded_dataset
import evaluate
from losses import MODES, STRATEGIES, RobustXIDLoss, check_num_negatives, faulty_positive_weights
from model import AUDIO_ENCODERS, VIDEO_ENCODERS, AVModel
from progress import progress


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("loss (METHOD.md)")
    g.add_argument("--mode", choices=MODES, default="robust", help="xid | weighted (faulty positives) | "
                   "soft (faulty negatives) | robust (both)")
    g.add_argument("--delta", type=float, default=-2.0, help="δ: W(s) mid-point at μ + δσ; -2 down-weights only clear outliers")
    g.add_argument("--kappa", type=float, default=0.5, help="κ > 0: sharpness of W(s); smaller is a harder step")
    g.add_argument("--w-min", type=float, default=0.25, help="w_min in [0, 1]: the lowest weight a pair can get")
    g.add_argument("--lam", type=float, default=0.5, help="λ in [0, 1]: soft-target mixing; paper's best 0.25-0.5")
    g.add_argument("--strategy", choices=STRATEGIES, default="cycle", help="softening scores S(j|i)")
    g.add_argument("--tau", type=float, default=0.07, help="τ > 0: temperature of P(ā_j | v_i)")
    g.add_argument("--tau-s", type=float, default=0.07, help="τ_s > 0: temperature of the softening scores")
    g.add_argument("--num-negatives", type=int, default=None,
                   help="K: negatives per step; default 1024 (the paper's) or N/2 on a smaller dataset")
    g.add_argument("--bank-momentum", type=float, default=0.5, help="m in [0, 1): memory-bank momentum")
    g.add_argument("--bank-init", choices=["embeddings", "random"], default="embeddings",
                   help="memory-bank slots before the first step: the initial encoders' embeddings (one pass "
                        "without gradients) or random unit vectors (as in NPID / the paper's code)")
    g.add_argument("--centred-heads", action=argparse.BooleanOptionalAction, default=True,
                   help="end the projection heads with a BatchNorm without parameters (centred embeddings "
                        "from the first step); --no-centred-heads: the plain MLP of runs before it")
    g.add_argument("--bank-refresh", choices=["step", "epoch"], default="epoch",
                   help="when the batch's bank slots take the new embeddings: after each step (the paper's) or "
                        "all at the end of the epoch, so that within an epoch every slot is of one age (on a small "
                        "dataset the per-step refresh lets the encoder pick its positive by age: README)")
    g.add_argument("--warmup-epochs", type=int, default=3,
                   help="epochs of plain xID before weights and soft targets switch on (scores and soft targets "
                        "from banks that have not learned yet mean nothing)")
    g.add_argument("--n0", type=float, default=0.0, help="n₀ in [0, 1): share of instances given another's audio")
    g.add_argument("--oracle-weights", choices=["off", "w-min", "zero"], default="off",
                   help="Weighted-xID with the ground truth in place of W(s): the injected pairs get w_min "
                        "(or 0), every other pair 1 -- a perfect detector of the injected pairs (the oracle "
                        "lines of plots.py delta)")
    g.add_argument("--seed", type=int, default=0, help="seeds injection, negatives, init and augmentation")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None, help="Kinetics as ROOT/<split>/<class>/*.mp4; "
                   "default: the embedded dataset in --toy-root (generated on first use)")
    g.add_argument("--toy-root", default="data/toy", help="where the embedded dataset lives")
    g.add_argument("--csv", default=None, help="official Kinetics CSV (label,youtube_id,time_start,time_end,split)")
    g.add_argument("--val-csv", default=None, help="CSV of the held-out split (Kinetics' validate.csv); "
                   "default: --csv, whose rows of --val-split are used when it has them")
    g.add_argument("--split", default="train", help="split folder / CSV split to pre-train on")
    g.add_argument("--val-split", default="val", help="held-out split for the retrieval printed at the end")
    g.add_argument("--subset", type=int, default=None, help="class-balanced, seeded subset of this many usable videos")
    g.add_argument("--classes", default=None, help="file with one class name per line: pre-train on these classes only")
    g = p.add_argument_group("clips")
    g.add_argument("--frames", type=int, default=8, help="frames per video clip (paper: 8)")
    g.add_argument("--fps", type=float, default=8.0, help="clip frame rate (paper: 16)")
    g.add_argument("--crop", type=int, default=32, help="crop size in pixels (paper: 112)")
    g.add_argument("--audio-seconds", type=float, default=1.0, help="audio clip length (paper: 2)")
    g.add_argument("--sample-rate", type=int, default=16000, help="audio rate in Hz (paper: 24000)")
    g.add_argument("--n-mels", type=int, default=40, help="mel bands of the log spectrogram")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--video-arch", choices=list(VIDEO_ENCODERS), default="small", help="small (CPU) or r2plus1d_18")
    g.add_argument("--audio-arch", choices=list(AUDIO_ENCODERS), default="small", help="small (CPU) or avid")
    g.add_argument("--epochs", type=int, default=20, help="training epochs (20: the quick start on the embedded data)")
    g.add_argument("--batch-size", type=int, default=32, help="clips per step over all GPUs (paper: 256)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 2e-4 at batch 256)")
    g.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay (paper: 1e-5)")
    g.add_argument("--workers", type=int, default=2, help="data-loading processes per GPU")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision: auto = bf16 on a GPU that has it, else fp16; off on the CPU")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="run folder (checkpoint, logs, results)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--log-every", type=int, default=20, help="also log every this many steps")
    g.add_argument("--bench", action="store_true", help="time some steps (no checkpoint) and print the split of step time")
    g.add_argument("--bench-steps", type=int, default=30, help="steps timed by --bench (after 5 warm-up steps)")
    g.add_argument("--no-eval", action="store_true", help="skip the retrieval / detection summary at the end")
    args = p.parse_args(argv)
    check_args(p, args)
    return p, args


def check_args(p, args):
    """Every check that can be made before touching data or the run folder; also reads --classes and
    makes the data paths absolute (the checkpoint's list of files then works from any folder)."""
    checks = [("--lam", 0 <= args.lam <= 1, "must be in [0, 1]"), ("--kappa", args.kappa > 0, "must be > 0"),
              ("--w-min", 0 <= args.w_min <= 1, "must be in [0, 1]"), ("--n0", 0 <= args.n0 < 1, "must be in [0, 1)"),
              ("--tau", args.tau > 0, "must be > 0"), ("--tau-s", args.tau_s > 0, "must be > 0"),
              ("--bank-momentum", 0 <= args.bank_momentum < 1, "must be in [0, 1)"),
              ("--epochs", args.epochs >= 1, "must be >= 1"), ("--batch-size", args.batch_size >= 2, "must be >= 2"),
              ("--lr", args.lr > 0, "must be > 0"), ("--warmup-epochs", args.warmup_epochs >= 0, "must be >= 0"),
              ("--workers", args.workers >= 0, "must be >= 0"), ("--frames", args.frames >= 1, "must be >= 1"),
              ("--fps", args.fps > 0, "must be > 0"), ("--audio-seconds", args.audio_seconds > 0, "must be > 0"),
              ("--num-negatives", args.num_negatives is None or args.num_negatives >= 1, "must be >= 1"),
              ("--crop", args.crop >= 16, "must be >= 16"), ("--log-every", args.log_every >= 1, "must be >= 1"),
              ("--sample-rate", args.sample_rate >= 1000, "must be >= 1000 (Hz)"),
              ("--n-mels", 1 <= args.n_mels <= data.max_n_mels(args.sample_rate),
               f"must be in [1, {data.max_n_mels(args.sample_rate)}] (the frequency bins of the spectrogram's window)"),
              ("--subset", args.subset is None or args.subset >= 2, "must be >= 2"),
              ("--bench-steps", args.bench_steps >= 1, "must be >= 1")]
    checks.append(("--oracle-weights", args.oracle_weights == "off" or (args.mode in ("weighted", "robust") and args.n0 > 0),
                   "needs --mode weighted or robust and --n0 > 0 (it weights the injected pairs)"))
    for flag, ok, rule in checks:
        if not ok:
            p.error(f"{flag} {rule}, got {getattr(args, flag[2:].replace('-', '_'))}")
    if args.data_root and not Path(args.data_root).is_dir():
        p.error(f"--data-root {args.data_root} is not a folder")
    for flag in ("csv", "val_csv", "classes"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_file():
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} does not exist")
    if args.val_csv and not args.csv:
        p.error("--val-csv needs --csv (the training split's CSV)")
    for flag in ("csv", "val_csv"):  # the columns now, not after training (the summary reads --val-csv)
        if getattr(args, flag):
            try:
                data.check_csv_columns(getattr(args, flag))
            except ValueError as e:
                p.error(f"--{flag.replace('_', '-')}: {e}")
    for flag in ("data_root", "toy_root", "csv", "val_csv"):  # the checkpoint's paths work from any folder
        if getattr(args, flag):
            setattr(args, flag, str(Path(getattr(args, flag)).resolve()))
    args.class_names = None
    if args.classes:
        args.class_names = [c.strip() for c in Path(args.classes).read_text().splitlines() if c.strip()]
        if not args.class_names:
            p.error(f"--classes {args.classes} names no class (one class name per line); "
                    f"leave the flag out to use every class")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here")
    if (Path(args.out) / "checkpoint.pt").exists() and not args.resume and not args.bench:
        p.error(f"--out {args.out} already holds a checkpoint: pass --resume to continue it, or another --out")
    if args.resume and not (Path(args.out) / "checkpoint.pt").exists():
        p.error(f"--resume: no checkpoint.pt in --out {args.out}")


# ----------------------------------------------------------------------------------------------
# The story: set up, train epoch by epoch, summarise
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    parser, args = get_args(argv)
    run = set_up(parser, args)            # processes, data, injection, model, loss, optimiser, resume
    if args.bench:
        run.bench = bench(run, args)      # median seconds of each part of a step, data wait of the total
        return run
    epoch = run.start_epoch
    try:
        if run.start_epoch == 0 and args.bank_init == "embeddings":
            fill_bank(run, args)
        for epoch in range(run.start_epoch, args.epochs):
            summary = train_one_epoch(run, args, epoch)
            save_checkpoint_then_log(run, args, epoch, summary)
        if not args.no_eval:              # every rank takes part: the features are shared out
            final_summary(run, args)
    except KeyboardInterrupt:             # a traceback would read like a crash, and nothing finished is lost
        stopped_by_ctrl_c(run, epoch, run.epochs_saved, args.epochs)
    return run                            # the caller holds it until the processes end (distributed.end_processes)


def stopped_by_ctrl_c(run, epoch, saved, epochs):
    """Say what the checkpoint holds (`saved` epochs of `epochs`) and how to go on, then leave with
    the shell's code for Ctrl-C. With several processes, leave without destructors, as
    distributed.end_processes explains. (Under torchrun, torchrun itself also reports the signal,
    and a rank waiting in a collective for one that has left may end with the backend's error.)"""
    kept = ("epoch 1 is" if saved == 1 else f"epochs 1-{saved} are") + f" in {run.out / 'checkpoint.pt'}"
    if saved == epochs:
        run.log(f"stopped (Ctrl-C) in the end-of-run summary: training had finished ({kept}); "
                f"`python evaluate.py {run.out}` evaluates it")
    elif saved:
        run.log(f"stopped (Ctrl-C) in epoch {epoch + 1}: {kept}; the same command with --resume continues")
    else:
        run.log("stopped (Ctrl-C) in epoch 1: no epoch had finished, so there is nothing to resume; run the "
                "command again to start over")
    if run.world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(130)


@dataclass
class Run:
    """Everything a run holds, built once by set_up()."""
    rank: int
    world: int
    device: torch.device
    log: callable                         # prints on rank 0 only
    out: Path                             # the run folder
    videos: list                          # data.Video per bank slot, in slot order
    classes: list
    pairs: list                           # injected faulty positives [(instance, audio donor)]
    injected: np.ndarray                  # (N,) bool
    natural: np.ndarray                   # (N,) bool, or None: the data marks no natural faulty pairs
    spec: data.ClipSpec
    loader: DataLoader
    sampler: DistributedSampler
    transforms: data.BatchTransforms
    model: AVModel                        # the encoders (what is saved and evaluated)
    ddp: torch.nn.Module                  # the model as the loop calls it (DDP-wrapped when world > 1)
    criterion: RobustXIDLoss              # the loss; owns the memory banks and the negatives' generator
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype                # None: full precision
    runlog: "RunLog"
    bank_refresh: str = "epoch"           # "step": update the bank slots after each step; "epoch": at its end
    pending_bank_updates: list = field(default_factory=list)   # (index, v, a) of the epoch's steps so far
    start_epoch: int = 0
    epochs_saved: int = 0                 # epochs the checkpoint holds (what Ctrl-C leaves to resume)
    bench: dict = None                    # --bench: {"median": seconds of each part of a step, "data_wait_of_total"}

    @property
    def is_main(self):
        return self.rank == 0


# ----------------------------------------------------------------------------------------------
# Set-up. Nothing is written to --out before every check has passed; --bench writes nothing there.
# ----------------------------------------------------------------------------------------------
def set_up(parser, args):
    """Processes, data, injection, model, loss, optimiser; the checkpoint's state on --resume."""
    rank, world, device = distributed.setup(args.device)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    out = Path(args.out)
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} must divide evenly over {world} processes")
    if args.batch_size // world < 2:  # BatchNorm (the encoders', the centred heads') needs 2 clips a process
        parser.error(f"--batch-size {args.batch_size} over {world} processes leaves fewer than 2 clips a process")
    spec, videos, classes, broken, K, audio_source, pairs = load_data(parser, args, rank, world, log)
    ckpt = None
    if args.resume:  # mapped to the CPU: load_state_dict then copies each tensor to where it lives
        ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        if ckpt["videos"] != [v.path for v in videos] or ckpt["injected_pairs"] != pairs:
            parser.error(f"--resume: the usable videos or the injected pairs differ from the checkpoint's "
                         f"({ckpt['num_instances']} slots then, {len(videos)} usable videos now): bank slots would not match")
        was = ckpt["args"].get("bank_refresh", "step")  # checkpoints older than the flag refreshed per step
        if was != args.bank_refresh:
            parser.error(f"--resume: the run refreshed its bank per {was}; pass --bank-refresh {was} to continue it")
        was = ckpt["args"].get("centred_heads", False)  # checkpoints older than the flag had plain heads
        if was != args.centred_heads:
            parser.error(f"--resume: the run's projection heads were {'' if was else 'not '}centred; pass "
                         f"--{'' if was else 'no-'}centred-heads to continue it")
        was = ckpt["args"].get("oracle_weights", "off")
        if was != args.oracle_weights:
            parser.error(f"--resume: the run was trained with --oracle-weights {was}; pass it to continue the run")
    if rank == 0 and not args.bench:  # every check has passed: now the run folder
        write_run_folder(args, out, videos, pairs, broken)

    dataset = data.AVClips(videos, spec, train=True, audio_source=audio_source)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler, num_workers=args.workers,
                        collate_fn=data.collate_clips, pin_memory=cuda, drop_last=True,
                        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    torch.manual_seed(args.seed)
    model = AVModel(args.video_arch, args.audio_arch, centred_heads=args.centred_heads).to(device)
    criterion = RobustXIDLoss(len(videos), 128, args.mode, K, args.tau, args.bank_momentum, args.delta, args.kappa,
                              args.w_min, args.lam, args.strategy, args.tau_s, seed=args.seed).to(device)
    if args.oracle_weights != "off":
        criterion.set_oracle(data.injected_mask(pairs, len(videos)), args.w_min if args.oracle_weights == "w-min" else 0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp = args.amp if args.amp != "auto" else ("off" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    # DDP wraps the model before the checkpoint is loaded: every rank loads the same file, so the
    # weights agree anyway (DDP broadcasts rank 0's at wrapping time)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    run = Run(rank=rank, world=world, device=device, log=log, out=out, videos=videos, classes=classes, pairs=pairs,
              injected=data.injected_mask(pairs, len(videos)), natural=embedded_dataset.natural_faulty_flags(videos),
              spec=spec, loader=loader, sampler=sampler, transforms=data.BatchTransforms(spec, train=True).to(device),
              model=model, ddp=ddp, criterion=criterion, optimizer=optimizer, scaler=scaler,
              amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp),
              runlog=RunLog(out, rank == 0 and not args.bench), bank_refresh=args.bank_refresh)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the moments to the parameters' device
        criterion.load_state_dict(ckpt["criterion"])
        scaler.load_state_dict(ckpt["scaler"])
        run.start_epoch = run.epochs_saved = ckpt["epoch"] + 1
        run.runlog.resume_at(run.start_epoch, ckpt.get("epoch_record"))
        log(f"resumed {out} after epoch {run.start_epoch}")
    elif rank == 0 and not args.bench:
        run.runlog.path.unlink(missing_ok=True)
    log(f"{args.mode}: {len(videos)} videos ({len(classes)} classes, {len(broken)} broken left out), K={K}, "
        f"n0={args.n0} ({len(pairs)} injected), device={device}x{world}, amp={amp}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return run


def load_data(parser, args, rank, world, log):
    """The clip spec, the usable videos (bank slot order), K, and the seeded injection."""
    if not args.data_root:
        if rank == 0:
            embedded_dataset.ensure_toy(args.toy_root, log=log)
        if world > 1:
            dist.barrier()
    spec = data.ClipSpec(frames=args.frames, fps=args.fps, size=args.crop, audio_seconds=args.audio_seconds,
                         sample_rate=args.sample_rate, n_mels=args.n_mels)
    try:
        videos, classes, broken = list_and_scan(args, args.split, spec, log, rank, world)
    except ValueError as e:  # a CSV without a column, --classes naming a class the data lacks
        parser.error(str(e))
    N = len(videos)
    K = args.num_negatives or min(1024, N // 2)
    try:
        check_num_negatives(K, N)
    except ValueError:
        parser.error(f"--num-negatives {K} must be smaller than the dataset ({N} usable videos)")
    if args.batch_size // world > N:
        parser.error(f"--batch-size {args.batch_size} is larger than the dataset ({N} usable videos)")
    audio_source, pairs = data.inject_faulty_positives(N, args.n0, args.seed)
    return spec, videos, classes, broken, K, audio_source, pairs


def write_run_folder(args, out, videos, pairs, broken):
    """args.json (every flag), injection.json (the injected pairs, by instance and file), broken.txt."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    data.atomic_write(out / "injection.json", json.dumps(
        {"n0": args.n0, "seed": args.seed, "num_instances": len(videos),
         "pairs": [{"instance": i, "audio_from": j, "video": videos[i].path, "audio_video": videos[j].path}
                   for i, j in pairs]}, indent=1))
    data.atomic_write(out / "broken.txt", "".join(f"{p}\t{r}\n" for p, r in broken))


def list_and_scan(args, split, spec, log, rank=0, world=1, classes=None):
    """The pre-training listing of a split: (usable videos, classes, broken [(path, reason)]).
    Rank 0 lists the files and reads the scan's cache; the files to probe are spread over all ranks;
    every rank gets rank 0's result, so all agree on N and on the order of the bank slots."""
    root = evaluate.pretraining_root(vars(args))
    csv_path = (args.val_csv or args.csv) if split != args.split else args.csv
    subset = args.subset if split == args.split else None

    def listing(probe_many):
        return data.pretraining_split(root, split, spec, csv_path, args.class_names if classes is None else None,
                                      subset, args.seed, classes=classes, probe_many=probe_many, log=log)
    return distributed.shared_by_ranks(listing, rank, world)


def reseed(seed, epoch, rank):
    """Every epoch starts from RNGs fixed by (seed, epoch, rank): a resumed run draws the same."""
    s = seed * 1_000_003 + epoch * 1_009 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# ----------------------------------------------------------------------------------------------
# One epoch, and one step of it: data -> model -> loss -> step -> bank update
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def fill_bank(run, args):
    """--bank-init embeddings: before the first step every slot gets the initial encoders' embeddings
    of a clip of its instance (one pass, no gradients, momentum 0), not a random unit vector; a slot
    whose clip fails to decode stays random (named). It costs one forward pass over the data: 2-5 s
    on the embedded data, a tenth of an epoch or so on Kinetics. A random
    slot carries nothing: as a positive it is a target no clip can predict, and next to slots already
    refreshed its age gives the positive away. With 15 steps an epoch (the embedded data) that was a
    whole epoch of training towards noise; on Kinetics it is a fraction of one epoch in many."""
    t = time.perf_counter()
    reseed(args.seed, 10**6, run.rank)  # a stream of its own, apart from every epoch's
    # every slot, in order (the training loader drops the last, incomplete batch); a process's last
    # batch of one clip is joined to the one before, as BatchNorm needs two
    share = list(range(run.rank, len(run.videos), run.world))
    per = run.loader.batch_size
    batches = [share[k:k + per] for k in range(0, len(share), per)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2:] = [batches[-2] + batches[-1]]
    steps = distributed.agreed_count(len(batches), run.device, run.world)  # collectives: the same number everywhere
    loader = DataLoader(run.loader.dataset, batch_sampler=batches[:steps], num_workers=run.loader.num_workers,
                        collate_fn=data.collate_clips)
    run.model.train()  # the embeddings training will compare them with: batch statistics
    for batch in progress(loader, desc="filling the memory bank", unit="step", disable=not run.is_main,
                          leave=False):
        for e in batch["errors"]:
            print(f"{'' if run.is_main else f'[rank {run.rank}] '}data error (slot left random): {e}",
                  file=sys.stdout if run.is_main else sys.stderr, flush=True)
        if not distributed.every_rank_has_data("video" in batch and len(batch["index"]) >= 2, run.device, run.world):
            continue
        video, audio, index = to_device(batch, run.device)
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            v, a = run.model(run.transforms.video(video), run.transforms.audio(audio))
        run.criterion.bank.update(index, v, a, momentum=0.0)
    run.log(f"memory bank filled with the initial encoders' embeddings in {time.perf_counter() - t:.1f}s")


def train_one_epoch(run, args, epoch):
    """One pass over the data; returns the epoch's summary (means of the step records, bank
    statistics, speed, data errors of every rank)."""
    reseed(args.seed, epoch, run.rank)
    run.sampler.set_epoch(epoch)
    run.model.train()
    warmup = epoch < args.warmup_epochs
    labels = torch.tensor([v.label for v in run.videos], device=run.device)
    labels_known = all(v.label >= 0 for v in run.videos)
    step = epoch * len(run.loader)
    sums, n_steps, clips, data_errors = {}, 0, 0, []
    wait = compute = 0.0
    t_epoch = t_last = time.perf_counter()
    bar = progress(run.loader, desc=f"epoch {epoch + 1}/{args.epochs}{' (warm-up: xID)' if warmup else ''}",
                   unit="step", disable=not run.is_main, leave=False)
    for batch in bar:
        t_ready = time.perf_counter()
        wait += t_ready - t_last
        for e in batch["errors"]:  # every rank names its own failures at once; rank 0 counts them all
            data_errors.append(e)
            print(f"{'' if run.is_main else f'[rank {run.rank}] '}data error (clip left out of this step, "
                  f"not replaced): {e}", file=sys.stdout if run.is_main else sys.stderr, flush=True)
        # every clip failed (named above), or one is left: BatchNorm needs two (each rank must agree)
        if not distributed.every_rank_has_data("video" in batch and len(batch["index"]) >= 2, run.device, run.world):
            t_last = time.perf_counter()
            continue
        loss, diag, index = train_step(run, batch, warmup, where=f"epoch {epoch + 1}, step {step}")
        compute += time.perf_counter() - t_ready

        terms = {"loss": loss, "loss_v2a": diag["loss_v2a"], "loss_a2v": diag["loss_a2v"],
                 "batch_mean_weight": diag["mean_weight"], "target_on_positive": diag["target_on_positive"]}
        record = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).tolist()))  # one GPU sync
        if labels_known and diag["lam"] > 0:  # soft targets this step: where their moved mass lands
            record["soft_mass_same_class"], record["same_class_share"] = same_class_target_mass(diag, index, labels)
        for k, val in record.items():
            sums[k] = sums.get(k, 0.0) + val
        n_steps += 1
        clips += len(index) * run.world
        step += 1
        bar.set_postfix(loss=f"{record['loss']:.3f}", w=f"{record['batch_mean_weight']:.2f}",
                        clips_s=f"{clips / (time.perf_counter() - t_epoch):.0f}", refresh=False)  # shown at the bar's pace
        if step % args.log_every == 0:
            run.runlog.write(kind="step", epoch=epoch + 1, step=step, **record)
        t_last = time.perf_counter()

    refresh_bank_at_epoch_end(run)
    elapsed = time.perf_counter() - t_epoch
    data_errors = [e for errors in distributed.gather_objects(data_errors, run.world) for e in errors]
    if n_steps == 0:
        raise SystemExit(f"epoch {epoch + 1}: no step could be taken, every clip failed to decode; first errors:\n  "
                         + "\n  ".join(data_errors[:5]))
    summary = {k: v / n_steps for k, v in sums.items()}
    summary.update(bank_statistics(run.criterion, run.injected, run.natural))
    summary.update(step=step, warmup=warmup, clips_per_s=clips / elapsed,
                   data_wait_fraction=wait / max(wait + compute, 1e-9), data_errors=len(data_errors),
                   data_error_files=data_errors[:100], bank_spread_across_ranks=distributed.bank_spread(run.criterion, run.world))
    return summary


def train_step(run, batch, warmup, where):
    """One optimisation step. A non-finite loss stops the run, naming the term and `where`."""
    video, audio, index = to_device(batch, run.device)
    video, audio = run.transforms.video(video), run.transforms.audio(audio)   # jittered, normalised; (B, 1, F, S)
    v, a = forward(run, video, audio)
    loss, diag = loss_of(run, v, a, index, warmup, where)
    optimise(run, loss)
    if run.bank_refresh == "step":
        run.criterion.bank.update(index, v, a)                                # v̄_i, ā_i <- the new v_i, a_i
    else:                                                                     # at the end of the epoch
        run.pending_bank_updates.append((index, v.detach(), a.detach()))
    return loss, diag, index


def refresh_bank_at_epoch_end(run):
    """--bank-refresh epoch: the epoch's updates as one. An epoch visits each slot once (the sampler
    is a permutation), so one update of all its slots equals the updates step by step."""
    if run.pending_bank_updates:
        index, v, a = (torch.cat(parts) for parts in zip(*run.pending_bank_updates))
        run.criterion.bank.update(index, v, a)
    run.pending_bank_updates.clear()


def to_device(batch, device):
    return (batch["video"].to(device, non_blocking=True),                     # (B, 3, T, H, W) uint8
            batch["audio"].to(device, non_blocking=True),                     # (B, 1, samples)
            batch["index"].to(device, non_blocking=True))                     # (B,) bank slots


def forward(run, video, audio):
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        return run.ddp(video, audio)                                           # v, a: (B, 128) each


def loss_of(run, v, a, index, warmup, where):
    loss, diag = run.criterion(v, a, index, warmup=warmup)
    if not torch.isfinite(loss):
        bad = [k for k in ("loss_v2a", "loss_a2v") if not torch.isfinite(diag[k])]
        raise SystemExit(f"non-finite loss at {where}: {', '.join(bad) or 'loss'} "
                         f"= {[diag[k].item() for k in ('loss_v2a', 'loss_a2v')]}; try a lower --lr or --amp bf16/off")
    return loss, diag


def optimise(run, loss):
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()


# ----------------------------------------------------------------------------------------------
# After an epoch: checkpoint, then the log record
# ----------------------------------------------------------------------------------------------
def save_checkpoint_then_log(run, args, epoch, summary):
    """The checkpoint first, so a log record never describes an epoch the checkpoint lacks; the
    record also goes into the checkpoint, so a resumed run can write it if the log missed it."""
    record = dict(kind="epoch", epoch=epoch + 1, **summary)
    if run.is_main:
        atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "criterion": run.criterion.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
                     "num_instances": len(run.videos), "classes": run.classes, "videos": [v.path for v in run.videos],
                     "instances": [[v.path, v.label, v.duration] for v in run.videos],
                     "injected_pairs": run.pairs, "args": vars(args), "epoch_record": record}, run.out / "checkpoint.pt")
        # RNGs need no saving: reseed() fixes them at every epoch start from (seed, epoch, rank),
        # and the negatives' generator is part of the criterion's state.
    run.epochs_saved = epoch + 1
    run.runlog.write(**record)
    run.log(epoch_line(summary, args, epoch))


def epoch_line(summary, args, epoch):
    """The epoch's line on the console: the loss, what the loss applied (weights after the warm-up,
    soft targets where λ > 0), detection, speed."""
    parts = [f"epoch {epoch + 1}/{args.epochs}: loss {summary.get('loss', float('nan')):.3f}"]
    if args.mode in ("weighted", "robust") and not summary.get("warmup", False):
        parts.append(f"weight applied {summary['batch_mean_weight']:.2f} " + (
            "(oracle)" if args.oracle_weights != "off" else
            f"(W(s) < 0.5 on {100 * summary['w_share_below_half']:.0f}% of slots)"))
    if "soft_mass_same_class" in summary:
        parts.append(f"target on positive {summary['target_on_positive']:.2f}, moved mass in class "
                     f"{summary['soft_mass_same_class']:.2f} (chance {summary['same_class_share']:.2f})")
    parts += [f"{kind} AUC {summary[f'{kind}_auc']:.2f}" for kind in ("injected", "natural") if f"{kind}_auc" in summary]
    parts.append(f"{summary['clips_per_s']:.0f} clips/s  data wait {100 * summary['data_wait_fraction']:.0f}%")
    if summary["data_errors"]:
        parts.append(f"data errors {summary['data_errors']}")
    return "  ".join(parts)

class RunLog:
    """log.jsonl, one JSON object per line; rank 0 only."""

    def __init__(self, out, active):
        self.path, self.active = Path(out) / "log.jsonl", active

    def write(self, **record):
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def resume_at(self, epoch, epoch_record):
        """On resume: drop what was logged after the checkpoint (steps of an epoch that did not finish,
        a line cut short by the kill) and add the checkpoint's own epoch record if the run died before
        writing it, so the log has every epoch and step once."""
        if not self.active:
            return
        kept = []
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["epoch"] <= epoch:
                kept.append(record)
        if epoch_record and not any(r["kind"] == "epoch" and r["epoch"] == epoch for r in kept):
            kept.append(epoch_record)
        data.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def atomic_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Epoch statistics
# ----------------------------------------------------------------------------------------------
def bank_statistics(criterion, injected, natural):
    """Weights of every slot under the current μ, σ, and how well they find the faulty pairs."""
    bank = criterion.bank
    mu, sigma = bank.score_stats()
    w = faulty_positive_weights(bank.s, mu, sigma, criterion.delta, criterion.kappa, criterion.w_min)
    stats = {"mu": mu.item(), "sigma": sigma.item(), "w_mean": w.mean().item(), "smallest_weight": w.min().item(),
             "w_share_below_half": (w < 0.5).float().mean().item()}
    for name, d in evaluate.detection_report(bank.s.cpu().numpy(), injected, natural).items():
        stats.update({f"{name}_{k}": v for k, v in d.items()})
    return stats


def same_class_target_mass(diag, index, labels):
    """Of the target mass Soft-xID moves off the positive, the share that lands on same-class
    negatives (faulty negatives found), and the share of same-class negatives (chance)."""
    same = labels[diag["negatives"]][None, :] == labels[index][:, None]          # (B, K)
    moved = diag["targets_v"][:, 1:] + diag["targets_a"][:, 1:]                   # (B, K)
    total = moved.sum()
    return ((moved * same).sum() / total).item() if total > 0 else float("nan"), same.float().mean().item()


# ----------------------------------------------------------------------------------------------
# The end of a run: what it learned
# ----------------------------------------------------------------------------------------------
def final_summary(run, args):
    """Video retrieval of held-out clips among the training clips, and faulty-positive detection.
    Each rank extracts the features of its share of the videos (at Kinetics scale that is the cost
    of the summary: 2 clips per video), so no rank waits on another for long; the nearest-neighbour
    search runs on the training device, in chunks of queries, on rank 0."""
    t, log, device = time.perf_counter(), run.log, run.device
    results = {}
    eval_spec = replace(run.spec, need_audio=False)
    try:
        val, _, _ = list_and_scan(args, args.val_split, eval_spec, log, run.rank, run.world, classes=run.classes)
    except (FileNotFoundError, ValueError) as e:  # no such split, nothing usable in it, a bad CSV
        log(f"no held-out split for the retrieval summary: {e}")
        val = None
    if val:
        gallery, queries = evaluate.pretraining_set_features(run.model, run.videos, val, eval_spec, device, args.workers,
                                                             log, kinds=("pooled",), rank=run.rank, world=run.world)
        if gallery is not None and run.is_main:
            r = evaluate.recall_at_k(queries.features["pooled"], gallery.features["pooled"], queries.labels,
                                     gallery.labels, ks=(1, 5), device=device)
            results["train_summary_retrieval"] = r
            log(f"video retrieval, {len(queries.labels)} held-out {args.val_split} clips -> {len(gallery.labels)} "
                f"{args.split} clips: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items())
                + f"  (chance R@1 ~ {chance(gallery.labels, queries.labels):.3f})")
    if not run.is_main:
        return
    for name, d in evaluate.detection_report(run.criterion.bank.s.cpu().numpy(), run.injected, run.natural).items():
        results[f"detection_{name}"] = d
        log(f"{name} faulty positives ({d['n_faulty']}"
            + (", marked in annotations.csv" if name == "natural" else "")
            + f"): ROC AUC {d['auc']:.3f}, precision of the {d['n_faulty']} lowest-scored "
            f"{d['precision_at_n']:.3f} (chance {d['chance']:.3f})")
    path = evaluate.merge_results(run.out, results)
    log(f"summary in {time.perf_counter() - t:.0f}s, written to {path}")


def chance(gallery_labels, query_labels):
    """Expected R@1 of random features: the share of gallery items of the query's class."""
    counts = torch.bincount(gallery_labels, minlength=int(query_labels.max()) + 1).float() / len(gallery_labels)
    return counts[query_labels].mean().item()


# ----------------------------------------------------------------------------------------------
# --bench: the same step, its parts timed
# ----------------------------------------------------------------------------------------------
def bench(run, args):
    """Time --bench-steps steps (after 5 untimed ones): data wait and transfer, batch transforms,
    forward, loss, backward (+ optimizer), bank update. The parts are train_step's, called in turn."""
    device = run.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parts = {k: [] for k in ("data", "transforms", "forward", "loss", "backward", "bank")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches, n = iter(run.loader), 0
    run.model.train()
    while n < args.bench_steps + 5:
        t = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            batches = iter(run.loader)
            continue
        if "video" not in batch:
            continue
        times = []

        def done():  # the part just run ends here
            nonlocal t
            sync()
            times.append(time.perf_counter() - t)
            t = time.perf_counter()

        video, audio, index = to_device(batch, device)
        done()
        video, audio = run.transforms.video(video), run.transforms.audio(audio)
        done()
        v, a = forward(run, video, audio)
        done()
        loss, _ = loss_of(run, v, a, index, False, where=f"bench step {n}")
        done()
        optimise(run, loss)
        done()
        run.criterion.bank.update(index, v, a)
        done()
        if n >= 5:
            for name, seconds in zip(parts, times):
                parts[name].append(seconds)
        n += 1
    med = {k: float(np.median(v)) for k, v in parts.items()}
    step = sum(med.values())
    wait_of_total = sum(parts["data"]) / sum(map(sum, parts.values()))  # a slow batch now and then counts here
    half = len(parts["data"]) // 2  # an epoch's start (its empty queue) shows in one half, a steady shortfall in both
    wait_halves = [sum(parts["data"][s]) / max(sum(sum(p[s]) for p in parts.values()), 1e-12)
                   for s in (slice(0, half), slice(half, None))]
    per_step = len(index)
    print(f"bench: {args.bench_steps} steps, batch {per_step}, {args.mode}/{args.strategy}, K={run.criterion.K}, "
          f"bank update timed after each step (with --bank-refresh epoch it happens at the epoch's end), "
          f"{args.video_arch}+{args.audio_arch}, {args.frames}x{args.crop}x{args.crop}, device {device}")
    print(f"  clips/s {per_step / step:.1f}   data-wait fraction {med['data'] / step:.3f}   step {1e3 * step:.1f} ms (medians; "
          f"data wait of the total time {wait_of_total:.3f}: {wait_halves[0]:.3f} in the first half "
          f"of the steps, {wait_halves[1]:.3f} in the second)")
    print("  " + "  ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items()))
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        import resource
        print(f"  peak process memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return {"median": med, "data_wait_of_total": wait_of_total, "data_wait_halves": wait_halves}


if __name__ == "__main__":
    finished_run = main(sys.argv[1:])
    if dist.is_available() and dist.is_initialized():
        distributed.end_processes()
