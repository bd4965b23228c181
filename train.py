"""Pre-train video and audio encoders with xID, Weighted-xID, Soft-xID or Robust-xID.

References: Morgado, Misra, Vasconcelos, "Robust Audio-Visual Instance Discrimination", CVPR 2021
(the method, METHOD.md); Morgado et al., "Audio-Visual Instance Discrimination with Cross-Modal
Agreement" (AVID), CVPR 2021 (the encoders and the paper-scale recipe); Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018 (the memory bank).

    python train.py                               # Robust-xID on the embedded dataset (CPU, ~2 min)
    python train.py --mode weighted --n0 0.3      # 30% injected faulty positives, down-weighted
    torchrun --nproc_per_node=8 train.py @configs/paper.txt --data-root /data/k400_128 \\
        --out runs/k400

The story: set up (processes, data, injected faulty positives, model, loss and banks, optimiser),
fill the memory banks, then per epoch: for each batch forward, loss, backward, step, bank update;
after each epoch a checkpoint and a log record; at the end a retrieval and detection summary.
The flags come last in this file; `@FILE` reads flags from a file (one or more per line, '#'
starts a comment), and later flags override it. The run folder (--out) is described in runs.py.
"""
import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import data
import distributed
import embedded_dataset
import evaluate
import listings
import runs
from losses import MODES, STRATEGIES, RobustXIDLoss, check_num_negatives, mean_over_ranks
from model import AUDIO_ENCODERS, VIDEO_ENCODERS, AVModel

# BatchNorm (the encoders', the centred heads') centres over a process's batch: with 2 clips their
# embeddings come out exact opposites, so every step, and the bank's fill, takes at least this many.
MIN_CLIPS = 3
# The bank fill's clips are drawn as if from this epoch: apart from every training epoch's draws.
BANK_FILL_DRAWS = 10**6

# The flags a resumed run may change (the held-out split only serves the end-of-run summary);
# every other one must be the run's own: one recipe a run.
RESUMABLE_FLAGS = ("epochs", "workers", "device", "amp", "out", "resume", "log_every", "no_eval",
                   "val_csv", "val_split", "compile", "cudnn_benchmark")


# ----------------------------------------------------------------------------------------------
# The story
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    parser, args = get_args(argv)
    run = set_up(parser, args)
    epoch = run.start_epoch
    try:
        if run.start_epoch == 0 and args.bank_init == "embeddings":
            fill_bank(run, args)
        for epoch in range(run.start_epoch, args.epochs):
            summary = train_one_epoch(run, args, epoch)
            save_checkpoint_then_log(run, args, epoch, summary)
        if not args.no_eval:  # every rank takes part: the features are shared out
            end_of_run_summary(run, args)
    except KeyboardInterrupt:  # a traceback would read like a crash, and nothing finished is lost
        runs.stopped_by_ctrl_c(run.log, run.out, epoch, run.epochs_saved, args.epochs, run.world)
    finally:  # the folder is free again for a --resume, even in this same process
        if run.folder_lock:
            run.folder_lock.close()
    return run  # the caller holds it until the processes end (distributed.end_processes)


@torch.no_grad()
def fill_bank(run, args):
    """--bank-init embeddings: before the first step every slot gets the initial encoders'
    embeddings of a clip of its instance (momentum 0). A random slot carries nothing: as a
    positive it is a target no clip can predict, and beside refreshed slots its age gives the
    positive away. A slot whose clip fails to decode stays random (named). Each process embeds its
    own share, however many batches that is, and one update gathers every share."""
    t = time.perf_counter()
    batches = fill_batches([(BANK_FILL_DRAWS, i) for i in range(run.rank, len(run.videos),
                                                                run.world)],
                           run.loader.batch_size)
    loader = DataLoader(run.loader.dataset, batch_sampler=batches,
                        num_workers=run.loader.num_workers, collate_fn=data.collate_clips)
    run.model.train()  # the embeddings training will compare them with: batch statistics
    dim = run.criterion.bank.v_bar.shape[1]  # a process whose clips all failed still takes part
    filled = [(torch.empty(0, dtype=torch.long, device=run.device),
               torch.empty(0, dim, device=run.device), torch.empty(0, dim, device=run.device))]
    for batch in runs.progress(loader, desc="filling the memory bank", unit="step",
                               disable=not run.is_main, leave=False):
        report_data_errors(run, batch, "slot left random")
        if len(batch["index"]) < MIN_CLIPS:  # too few decoded for BatchNorm: left random, named
            continue
        video = run.transforms.video(batch["video"].to(run.device), batch["jitter"])
        audio = run.transforms.audio(batch["audio"].to(run.device))
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp):
            v, a = run.model(video, audio)
        filled.append((batch["index"].to(run.device), v.float(), a.float()))
    index, v, a = (torch.cat(parts) for parts in zip(*filled))
    run.criterion.bank.update(index, v, a, momentum=0.0)  # every process's share, gathered
    filled, N = sum(distributed.gather_objects(len(index), run.world)), len(run.videos)
    run.log(f"memory bank filled with the initial encoders' embeddings in "
            f"{time.perf_counter() - t:.1f}s: {filled} of {N} slots"
            + (f" ({N - filled} left random: their clips, or too many of their batch's, failed "
               f"to decode)" if filled < N else ""))


def train_one_epoch(run, args, epoch):
    """One pass over the data: forward, loss, backward, step and bank update for every batch.
    Returns the epoch's summary (means of the step records, bank statistics, speed, data errors)."""
    run.loader.sampler.set_epoch(epoch)  # the epoch's permutation, and its clips' draws
    run.model.train()
    warmup = epoch < args.warmup_epochs  # plain xID: the banks have not learned yet
    step = epoch * len(run.loader)
    sums, n_steps, clips, data_errors, wait, compute = {}, 0, 0, [], 0.0, 0.0
    t_epoch = t_last = time.perf_counter()
    desc = f"epoch {epoch + 1}/{args.epochs}{' (warm-up: xID)' if warmup else ''}"
    bar = runs.progress(run.loader, desc=desc, unit="step", disable=not run.is_main, leave=False)
    for batch in bar:
        t_ready = time.perf_counter()
        wait += t_ready - t_last
        data_errors += report_data_errors(run, batch, "clip left out of this step, not replaced")
        # every clip failed, or too few are left for BatchNorm (and every rank must agree)
        if not distributed.every_rank_has_data(len(batch["index"]) >= MIN_CLIPS, run.device,
                                               run.world):
            t_last = time.perf_counter()
            continue
        # 1. the batch on the model's device; jitter, normalisation and log-mel run there
        index = batch["index"].to(run.device, non_blocking=True)             # (B,) bank slots
        video = batch["video"].to(run.device, non_blocking=True)             # (B, 3, T, H, W) uint8
        audio = batch["audio"].to(run.device, non_blocking=True)             # (B, 1, samples)
        video = run.transforms.video(video, batch["jitter"])                # colour jitter per clip
        audio = run.transforms.audio(audio)                                  # log-mel (B, 1, F, S)
        # 2. forward: L2-normalised embeddings v_i, a_i
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp):
            v, a = run.ddp(video, audio)                                     # (B, 128) each
        # 3. the loss against the memory banks: xID, Weighted, Soft or Robust (losses.py)
        loss, diag = run.criterion(v, a, index, warmup=warmup)
        stop_if_not_finite(loss, diag, f"epoch {epoch + 1}, step {step}")
        # 4. backward and step (the scaler is a no-op unless --amp fp16)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        # 5. bank update: v̄_i <- normalize(m v̄_i + (1 - m) v_i), and the same for ā_i
        if args.bank_refresh == "step":
            run.criterion.bank.update(index, v, a)
        else:  # the epoch's updates are applied together at its end (refresh_bank_at_epoch_end)
            run.pending_bank_updates.append((index, v.detach(), a.detach()))

        compute += time.perf_counter() - t_ready
        record = step_record(run, loss, diag, index, batch["faulty"])
        for k, val in record.items():
            sums[k] = sums.get(k, 0.0) + val
        n_steps, clips, step = n_steps + 1, clips + len(index) * run.world, step + 1
        bar.set_postfix(loss=f"{record['loss']:.3f}", w=f"{record['batch_mean_weight']:.2f}",
                        clips_s=f"{clips / (time.perf_counter() - t_epoch):.0f}", refresh=False)
        if step % args.log_every == 0:
            run.runlog.write(kind="step", epoch=epoch + 1, step=step, **record)
        t_last = time.perf_counter()

    refresh_bank_at_epoch_end(run)
    elapsed = time.perf_counter() - t_epoch
    data_errors = [e for errs in distributed.gather_objects(data_errors, run.world) for e in errs]
    if n_steps == 0:
        raise SystemExit(f"epoch {epoch + 1}: no step could be taken, every clip failed to decode; "
                         "first errors:\n  " + "\n  ".join(data_errors[:5]))
    summary = {k: v / n_steps for k, v in sums.items()}
    if "clean_rows" in summary:  # a ratio of the epoch's sums: the mean over its clean rows
        summary["loss_clean_pairs"] = summary.pop("clean_loss_sum") / max(
            summary.pop("clean_rows"), 1e-9)
    summary.update(evaluate.bank_detection(run.criterion, run.injected, run.natural))
    summary.update(step=step, warmup=warmup, clips_per_s=clips / elapsed,
                   data_wait_fraction=wait / max(wait + compute, 1e-9),
                   data_errors=len(data_errors), data_error_files=data_errors[:100],
                   bank_spread_across_ranks=distributed.bank_spread(run.criterion, run.world))
    return summary


def refresh_bank_at_epoch_end(run):
    """--bank-refresh epoch: the epoch's updates as one. An epoch visits each slot once (the sampler
    is a permutation), so one update of all its slots equals the updates step by step."""
    if run.pending_bank_updates:
        index, v, a = (torch.cat(parts) for parts in zip(*run.pending_bank_updates))
        run.criterion.bank.update(index, v, a)
    run.pending_bank_updates.clear()


def save_checkpoint_then_log(run, args, epoch, summary):
    """The checkpoint first, so that a log record never describes an epoch the checkpoint lacks;
    the record goes into the checkpoint too, so that a resumed run can write it if the log missed
    it. No RNG state is saved: a clip's draws follow from (seed, epoch, index) (data.AVClips),
    the epoch's order from (seed, epoch), and the negatives' generator is in the criterion's
    state."""
    record = dict(kind="epoch", epoch=epoch + 1, **summary)
    if run.is_main:
        runs.save_checkpoint({
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "criterion": run.criterion.state_dict(), "scaler": run.scaler.state_dict(),
            "epoch": epoch, "num_instances": len(run.videos), "classes": run.classes,
            "videos": [v.path for v in run.videos],
            "instances": [[v.path, v.label, v.duration] for v in run.videos],
            "injected_pairs": run.pairs, "args": vars(args), "epoch_record": record},
            run.out / "checkpoint.pt")
    run.epochs_saved = epoch + 1
    run.runlog.write(**record)
    run.log(runs.epoch_line(summary, args, epoch))


def end_of_run_summary(run, args):
    """Video retrieval of the held-out clips among the training clips, and faulty-positive
    detection by the bank's scores; written to results.json (evaluate.py adds the transfer)."""
    t = time.perf_counter()
    spec = replace(run.spec, need_audio=False)
    try:
        val, _, _ = list_and_scan(args, args.val_split, spec, run.log, run.rank, run.world,
                                  classes=run.classes)
    except (FileNotFoundError, ValueError) as e:  # no such split, nothing usable, a bad CSV
        run.log(f"no held-out split for the retrieval summary: {e}")
        val = None
    results = evaluate.run_summary(run.model, run.criterion, run.videos, val, spec, run.device,
                                   args.workers, run.injected, run.natural, run.log, run.rank,
                                   run.world, names=(args.split, args.val_split))
    if run.is_main:  # its detection numbers replace an older evaluation's: that part is mixed now
        results.update(summary_epoch=run.epochs_saved, pretrain_evaluated_epoch=None)
        path = runs.merge_results(run.out, results)
        run.log(f"summary in {time.perf_counter() - t:.0f}s, written to {path}")


# ----------------------------------------------------------------------------------------------
# Set-up. Nothing is written to --out before every check has passed.
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a run holds, built once by set_up()."""
    rank: int
    world: int
    device: torch.device
    log: callable                       # prints on rank 0 only
    out: Path                           # the run folder
    videos: list                        # data.Video per bank slot, in slot order
    classes: list
    pairs: list                         # injected faulty positives [(instance, audio donor)]
    injected: np.ndarray                # (N,) bool
    natural: np.ndarray                 # (N,) bool, or None where the data marks none
    labels: torch.Tensor                # (N,) class per slot, on the device; None if unlabelled
    spec: data.ClipSpec
    loader: DataLoader
    transforms: data.BatchTransforms
    model: AVModel                      # the encoders (what is saved and evaluated)
    ddp: torch.nn.Module                # the model as the loop calls it (DDP when world > 1)
    criterion: RobustXIDLoss            # the loss; owns the banks and the negatives' generator
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype              # None: full precision
    runlog: runs.RunLog
    pending_bank_updates: list = field(default_factory=list)  # --bank-refresh epoch
    start_epoch: int = 0
    epochs_saved: int = 0               # epochs the checkpoint holds (what Ctrl-C leaves)
    folder_lock: object = None          # held while this run writes to --out (runs.py)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def amp(self):
        return self.amp_dtype is not None


def set_up(parser, args, write=True):
    """Processes, data, injection, model, loss, optimiser; the checkpoint's state on --resume.
    write=False (tools/bench_step.py) leaves the run folder alone."""
    rank, world, device = distributed.setup(args.device)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    out = Path(args.out)
    if args.batch_size % world or args.batch_size // world < MIN_CLIPS:
        parser.error(f"--batch-size {args.batch_size} must divide evenly over {world} processes, "
                     f"at least {MIN_CLIPS} clips each (BatchNorm centres over them)")
    # one run writes to a folder at a time, held from before its checkpoint is read: a resumed
    # run must not continue from an epoch that another run is about to overwrite
    lock = runs.hold_run_folder(out) if rank == 0 and write and out.is_dir() else None
    try:
        return build_run(parser, args, rank, world, device, log, out, write, lock)
    except BaseException:
        if lock:
            lock.close()
        raise


def build_run(parser, args, rank, world, device, log, out, write, lock):
    """set_up's body, once the run folder is this process's (lock: held when the folder exists)."""
    ckpt = runs.load_checkpoint(out / "checkpoint.pt") if args.resume else None
    if ckpt is not None:  # before the listing, which takes long on Kinetics
        for flag, value in vars(args).items():
            if flag not in ckpt["args"] and flag not in RESUMABLE_FLAGS:
                parser.error(f"--resume: the run was saved by a train.py without --"
                             f"{flag.replace('_', '-')}; this one cannot continue it (start it "
                             f"again in another --out)")
            was = ckpt["args"].get(flag)
            if flag not in RESUMABLE_FLAGS + ("class_names",) and was != value:
                parser.error(f"--resume: the run was trained with --{flag.replace('_', '-')} "
                             + ("left out" if was is None else str(was)) + f", not {value}; "
                             + ("leave the flag out" if was is None else "pass the run's value")
                             + " to continue it")
    spec, videos, classes, broken, K, audio_source, pairs = load_data(parser, args, rank, world,
                                                                      log)
    if ckpt is not None and (ckpt["videos"] != [v.path for v in videos]
                             or ckpt["injected_pairs"] != pairs):
        parser.error(f"--resume: the usable videos or the injected pairs differ from the "
                     f"checkpoint's ({ckpt['num_instances']} slots then, {len(videos)} usable "
                     f"videos now): bank slots would not match")

    dataset = data.AVClips(videos, spec, train=True, audio_source=audio_source, seed=args.seed)
    sampler = data.EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler,
                        num_workers=args.workers, collate_fn=data.collate_clips, pin_memory=cuda,
                        drop_last=True, persistent_workers=args.workers > 0,
                        prefetch_factor=4 if args.workers else None)
    torch.manual_seed(args.seed)
    model = AVModel(args.video_arch, args.audio_arch, centred_heads=args.centred_heads).to(device)
    if args.channels_last:
        model.use_channels_last()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    criterion = RobustXIDLoss(len(videos), 128, args.mode, K, args.tau, args.bank_momentum,
                              args.delta, args.kappa, args.w_min, args.lam, args.strategy,
                              args.tau_s, seed=args.seed).to(device)
    injected = data.injected_mask(pairs, len(videos))
    labels = (torch.tensor([v.label for v in videos], device=device)
              if all(v.label >= 0 for v in videos) else None)
    if args.oracle_weights != "off":
        criterion.set_oracle(injected, args.w_min if args.oracle_weights == "w-min" else 0.0)
    if args.oracle_targets == "class":
        if labels is None:
            parser.error("--oracle-targets class needs every training video's class, and some "
                         "have none")
        criterion.set_class_oracle(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                 fused=args.fused_adam or None)
    amp = args.amp if args.amp != "auto" else (
        "off" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    # DDP wraps the model before the checkpoint is loaded: every rank loads the same file
    ddp = (DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
           if world > 1 else model)
    if args.compile:  # the forward (and its backward) compiled; model keeps the weights to save
        ddp = torch.compile(ddp)
    run = Run(rank=rank, world=world, device=device, log=log, out=out, videos=videos,
              classes=classes, pairs=pairs, injected=injected, labels=labels,
              natural=embedded_dataset.natural_faulty_flags(videos), spec=spec, loader=loader,
              transforms=data.BatchTransforms(spec, train=True).to(device),
              model=model, ddp=ddp, criterion=criterion, optimizer=optimizer, scaler=scaler,
              amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp),
              runlog=runs.RunLog(out, rank == 0 and write))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the moments to the parameters' device
        criterion.load_state_dict(ckpt["criterion"])
        if ckpt["scaler"]:  # empty when saved without fp16 (bf16, --amp off, a CPU)
            scaler.load_state_dict(ckpt["scaler"])
        run.start_epoch = run.epochs_saved = ckpt["epoch"] + 1
        log(f"resumed {out} after epoch {run.start_epoch}")
    if rank == 0 and write:  # every check has passed and the checkpoint has loaded: the folder
        run.folder_lock = lock or runs.hold_run_folder(out)
        runs.write_run_folder(out, args, videos, pairs, broken)
        if ckpt is not None:
            run.runlog.resume_at(run.start_epoch, ckpt["epoch_record"])
        else:
            run.runlog.start()
    log(f"{args.mode}: {len(videos)} videos ({len(classes)} classes, {len(broken)} broken left "
        f"out), K={K}, n0={args.n0} ({len(pairs)} injected), device={device}x{world}, amp={amp}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return run


def load_data(parser, args, rank, world, log):
    """The clip spec, the usable videos (bank slot order), K, and the seeded injection."""
    if not args.data_root:
        if rank == 0:
            embedded_dataset.ensure(args.embedded_root, downstream=False, log=log)
        if world > 1:
            dist.barrier()
    spec = data.ClipSpec(frames=args.frames, fps=args.fps, size=args.crop,
                         audio_seconds=args.audio_seconds, sample_rate=args.sample_rate,
                         n_mels=args.n_mels)
    try:
        videos, classes, broken = list_and_scan(args, args.split, spec, log, rank, world)
    except ValueError as e:  # a CSV without a column, --classes naming a class the data lacks
        parser.error(str(e))
    N = len(videos)
    K = num_negatives(args.num_negatives, N)
    try:
        check_num_negatives(K, N)
    except ValueError:
        parser.error(f"--num-negatives {K} must be smaller than the dataset ({N} usable videos)")
    if args.batch_size // world > N:
        parser.error(f"--batch-size {args.batch_size} is larger than the dataset ({N} usable "
                     f"videos)")
    audio_source, pairs = data.inject_faulty_positives(N, args.n0, args.seed)
    return spec, videos, classes, broken, K, audio_source, pairs


def num_negatives(asked, N):
    """K: --num-negatives, or the paper's 1024 where the dataset has 2,048 videos or more."""
    return asked or min(1024, N // 2)


def list_and_scan(args, split, spec, log, rank=0, world=1, classes=None):
    """A split's listing: (usable videos, classes, broken [(path, reason)]). Rank 0 lists and reads
    the scan's cache, the files to probe are spread over all ranks, and every rank gets rank 0's
    result, so all agree on N and on the order of the bank slots."""
    root = evaluate.pretraining_root(vars(args))
    csv_path = (args.val_csv or args.csv) if split != args.split else args.csv
    subset = args.subset if split == args.split else None

    def listing(probe_many):
        return listings.pretraining_split(root, split, spec, csv_path,
                                          args.class_names if classes is None else None, subset,
                                          args.seed, classes=classes, probe_many=probe_many,
                                          log=log)
    return distributed.shared_by_ranks(listing, rank, world)


# ----------------------------------------------------------------------------------------------
# Helpers of the loop
# ----------------------------------------------------------------------------------------------
def fill_batches(share, per):
    """The bank fill's batches: every slot of this process's share in order (the training loader
    drops the last, incomplete batch), `per` a batch; a last batch too small for BatchNorm joins
    the one before."""
    batches = [share[k:k + per] for k in range(0, len(share), per)]
    if len(batches) > 1 and len(batches[-1]) < MIN_CLIPS:
        batches[-2:] = [batches[-2] + batches[-1]]
    return batches


def report_data_errors(run, batch, consequence):
    """Every rank names its own failed clips at once (rank 0 counts them all at the epoch's end)."""
    for e in batch["errors"]:
        print(f"{'' if run.is_main else f'[rank {run.rank}] '}data error ({consequence}): {e}",
              file=sys.stdout if run.is_main else sys.stderr, flush=True)
    return batch["errors"]


def stop_if_not_finite(loss, diag, where):
    if not torch.isfinite(loss):
        bad = [k for k in ("loss_v2a", "loss_a2v") if not torch.isfinite(diag[k])]
        raise SystemExit(f"non-finite loss at {where}: {', '.join(bad) or 'loss'} = "
                         f"{[diag[k].item() for k in ('loss_v2a', 'loss_a2v')]}; "
                         f"try a lower --lr or --amp bf16/off")


def step_record(run, loss, diag, index, injected):
    """The step's numbers for the log, fetched from the device in one sync. injected (B,): the
    batch's clips whose audio was injected (the loader's "faulty")."""
    # with several processes each loss is a share of the global batch's; their mean is that loss
    loss = mean_over_ranks(loss.detach())
    terms = {"loss": loss, "loss_v2a": mean_over_ranks(diag["loss_v2a"]),
             "loss_a2v": mean_over_ranks(diag["loss_a2v"]),
             "batch_mean_weight": diag["mean_weight"],
             "target_on_positive": diag["target_on_positive"]}
    if run.pairs:  # the clean pairs' own loss: with many injected pairs the mean hides it
        injected = injected.to(index.device)
        terms.update(clean_loss_sum=mean_over_ranks(diag["row_loss"][~injected].sum()),
                     clean_rows=mean_over_ranks((~injected).sum().float()))
    record = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).tolist()))
    if diag["lam"] > 0 and run.labels is not None:  # where the soft targets moved the mass
        record["soft_mass_same_class"], record["same_class_share"] = \
            evaluate.soft_target_mass_in_class(diag, index, run.labels)
    return record


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, fromfile_prefix_chars="@",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.convert_arg_line_to_args = lambda line: line.split("#")[0].split()
    g = p.add_argument_group("the loss (METHOD.md)")
    g.add_argument("--mode", choices=MODES, default="robust",
                   help="xid | weighted (faulty positives) | soft (faulty negatives) | robust")
    g.add_argument("--delta", type=float, default=-2.0,
                   help="δ: W(s) has its mid-point at μ + δσ; -2 down-weights only clear outliers")
    g.add_argument("--kappa", type=float, default=0.5, help="κ > 0: W(s)'s sharpness")
    g.add_argument("--w-min", type=float, default=0.25, help="w_min in [0, 1]: the lowest weight")
    g.add_argument("--lam", type=float, default=0.5,
                   help="λ in [0, 1]: soft-target mixing; the supplement's best is 0.25-0.5")
    g.add_argument("--strategy", choices=STRATEGIES, default="cycle", help="the scores S(j|i)")
    g.add_argument("--tau", type=float, default=0.2,
                   help="τ > 0: temperature of P(ā_j | v_i); default 0.2, chosen on the embedded "
                        "data, where 0.07 can leave pre-training at chance's loss with injected "
                        "pairs (METHOD.md, deviations); the paper's 0.07 on Kinetics "
                        "(configs/paper.txt)")
    g.add_argument("--tau-s", type=float, default=0.07, help="τ_s > 0: temperature of S(j|i)")
    g.add_argument("--num-negatives", type=int, default=None,
                   help="K, negatives per step; default 1024 (the paper's), or N/2 on fewer videos")
    g.add_argument("--bank-momentum", type=float, default=0.5, help="m in [0, 1): bank momentum")
    g.add_argument("--warmup-epochs", type=int, default=3,
                   help="epochs of plain xID first: weights and soft targets from banks that have "
                        "not learned yet mean nothing")
    g.add_argument("--n0", type=float, default=0.0,
                   help="n₀ in [0, 1): share of instances given another instance's audio")
    g.add_argument("--oracle-weights", choices=["off", "w-min", "zero"], default="off",
                   help="Weighted-xID with the ground truth in place of W(s): the injected pairs "
                        "get w_min (or 0), all others 1 (a perfect detector; plots.py's oracle)")
    g.add_argument("--oracle-targets", choices=["off", "class"], default="off",
                   help="Soft-xID with the ground truth in place of S(j|i): the λ of the soft "
                        "target spread over the candidates of the instance's own class (perfect "
                        "softening of faulty negatives; plots.py lambda's bound)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the injection, the negatives, the initial weights and augmentation")
    g = p.add_argument_group("this project's start (METHOD.md, deviations from the paper)")
    g.add_argument("--bank-init", choices=["embeddings", "random"], default="embeddings",
                   help="the banks before the first step: the initial encoders' embeddings (one "
                        "pass without gradients), or random unit vectors (the paper's)")
    g.add_argument("--centred-heads", action=argparse.BooleanOptionalAction, default=True,
                   help="end the projection heads with a BatchNorm without parameters; "
                        "--no-centred-heads: the paper's MLP")
    g.add_argument("--bank-refresh", choices=["step", "epoch"], default="epoch",
                   help="when the batch's slots take the new embeddings: after each step (the "
                        "paper's; use it on Kinetics) or all at the epoch's end, so that every "
                        "slot is of one age within an epoch (a small dataset's short epochs)")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None, help="Kinetics as ROOT/<split>/<class>/<video>; "
                   "default: the embedded dataset in --embedded-root")
    g.add_argument("--embedded-root", default="data/embedded",
                   help="where the embedded dataset lives (written on first use)")
    g.add_argument("--csv", default=None,
                   help="official Kinetics CSV (label,youtube_id,time_start,time_end,split)")
    g.add_argument("--val-csv", default=None,
                   help="the held-out split's CSV (Kinetics' validate.csv); default: --csv")
    g.add_argument("--split", default="train", help="split folder / CSV split to pre-train on")
    g.add_argument("--val-split", default="val", help="held-out split of the end-of-run summary")
    g.add_argument("--subset", type=int, default=None,
                   help="a class-balanced, seeded subset of this many usable videos")
    g.add_argument("--classes", default=None, help="file of class names, one a line: only these")
    g = p.add_argument_group("clips")
    g.add_argument("--frames", type=int, default=8, help="frames per video clip (paper: 8)")
    g.add_argument("--fps", type=float, default=8.0, help="clip frame rate (paper: 16)")
    g.add_argument("--crop", type=int, default=32, help="crop size in pixels (paper: 112)")
    g.add_argument("--audio-seconds", type=float, default=1.0, help="audio clip length (paper: 2)")
    g.add_argument("--sample-rate", type=int, default=16000, help="audio rate in Hz (paper: 24000)")
    g.add_argument("--n-mels", type=int, default=40, help="mel bands of the log spectrogram")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--video-arch", choices=list(VIDEO_ENCODERS), default="small",
                   help="small (CPU) or r2plus1d_18 (paper)")
    g.add_argument("--audio-arch", choices=list(AUDIO_ENCODERS), default="small",
                   help="small (CPU) or avid (paper)")
    g.add_argument("--epochs", type=int, default=20, help="training epochs")
    g.add_argument("--batch-size", type=int, default=32, help="clips a step, all GPUs (paper: 256)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 2e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-5, help="Adam's (paper: 1e-5)")
    g.add_argument("--workers", type=int, default=2, help="data-loading processes per GPU")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision: auto = bf16 on a GPU that has it, else fp16; CPU: off")
    g = p.add_argument_group("speed (what is computed stays, its last digits may not; tools/gpu_check.py "
                             "measures each)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the forward and backward: faster steps after minutes of "
                        "compiling (a GPU run of hours; not worth it for a CPU run of minutes)")
    g.add_argument("--channels-last", action="store_true",
                   help="the video encoder in the channels-last 3-D layout (cuDNN's fast bf16 "
                        "convolutions on a GPU)")
    g.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN times its convolution algorithms on the first steps and keeps the "
                        "fastest (the clips' shape never changes)")
    g.add_argument("--fused-adam", action="store_true",
                   help="Adam's update of all parameters in a few fused kernels per step")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="the run folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--log-every", type=int, default=20, help="also log every this many steps")
    g.add_argument("--no-eval", action="store_true", help="skip the end-of-run summary")
    args = p.parse_args(argv)
    check_args(p, args)
    return p, args


def check_args(p, args):
    """Every check that needs no data, before anything is written. Also reads --classes and makes
    the data paths absolute, so that the checkpoint's list of files works from any folder."""
    max_mels = data.max_n_mels(args.sample_rate)
    checks = [
        ("--lam", 0 <= args.lam <= 1, "must be in [0, 1]"),
        ("--kappa", args.kappa > 0, "must be > 0"),
        ("--w-min", 0 <= args.w_min <= 1, "must be in [0, 1]"),
        ("--n0", 0 <= args.n0 < 1, "must be in [0, 1)"), ("--tau", args.tau > 0, "must be > 0"),
        ("--tau-s", args.tau_s > 0, "must be > 0"), ("--lr", args.lr > 0, "must be > 0"),
        ("--bank-momentum", 0 <= args.bank_momentum < 1, "must be in [0, 1)"),
        ("--epochs", args.epochs >= 1, "must be >= 1"), ("--seed", args.seed >= 0, "must be >= 0"),
        ("--batch-size", args.batch_size >= MIN_CLIPS, f"must be >= {MIN_CLIPS}"),
        ("--warmup-epochs", args.warmup_epochs >= 0, "must be >= 0"),
        ("--workers", args.workers >= 0, "must be >= 0"),
        ("--frames", args.frames >= 1, "must be >= 1"), ("--fps", args.fps > 0, "must be > 0"),
        ("--audio-seconds", args.audio_seconds > 0, "must be > 0"),
        ("--num-negatives", args.num_negatives is None or args.num_negatives >= 1, "must be >= 1"),
        ("--crop", args.crop >= 16, "must be >= 16"),
        ("--log-every", args.log_every >= 1, "must be >= 1"),
        ("--sample-rate", args.sample_rate >= 1000, "must be >= 1000 (Hz)"),
        ("--n-mels", 1 <= args.n_mels <= max_mels,
         f"must be in [1, {max_mels}] (the frequency bins of the spectrogram's window)"),
        ("--subset", args.subset is None or args.subset >= 2, "must be >= 2"),
        ("--oracle-weights", args.oracle_weights == "off" or
         (args.mode in ("weighted", "robust") and args.n0 > 0),
         "needs --mode weighted or robust and --n0 > 0 (it weights the injected pairs)"),
        ("--oracle-targets", args.oracle_targets == "off" or
         (args.mode in ("soft", "robust") and args.lam > 0),
         "needs --mode soft or robust and --lam > 0 (it makes the soft targets)")]
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
    for flag in ("csv", "val_csv"):  # now, not after training (the summary reads --val-csv)
        if getattr(args, flag):
            try:
                listings.check_csv_columns(getattr(args, flag))
            except ValueError as e:
                p.error(f"--{flag.replace('_', '-')}: {e}")
    for flag in ("data_root", "embedded_root", "csv", "val_csv", "classes"):
        if getattr(args, flag):
            setattr(args, flag, str(Path(getattr(args, flag)).resolve()))
    args.class_names = None
    if args.classes:
        args.class_names = [c.strip() for c in Path(args.classes).read_text().splitlines()
                            if c.strip()]
        if not args.class_names:
            p.error(f"--classes {args.classes} names no class (one class name per line); "
                    f"leave the flag out to use every class")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here")
    if (Path(args.out) / "checkpoint.pt").exists() and not args.resume:
        p.error(f"--out {args.out} already holds a checkpoint: pass --resume to continue it, "
                f"or another --out")
    if args.resume and not (Path(args.out) / "checkpoint.pt").exists():
        p.error(f"--resume: no checkpoint.pt in --out {args.out}")


if __name__ == "__main__":
    finished_run = main(sys.argv[1:])
    if dist.is_available() and dist.is_initialized():
        distributed.end_processes()
