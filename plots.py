"""Figures drawn from files of runs (results.json, log.jsonl, checkpoint.pt), saved as PNG + PDF.

  python plots.py delta        # Figure 1: δ sweep of Weighted-xID, one line per n₀
  python plots.py lambda       # Figure 2: λ sweep of Soft-xID with cycle targets
  python plots.py run RUN_DIR  # Figures 3-4, score histogram with W(s), training curves of one run
  python plots.py curves "A=RUN,RUN" "B=RUN"  # per-epoch loss and detection AUC of groups of runs
  python plots.py targets RUN_DIR   # the soft targets T(j|i) between instances sorted by class
  python plots.py embedded-clip     # a frame strip and spectrogram of an embedded clip

A sweep trains and evaluates every grid point that has no complete results.json yet (an interrupted
sweep resumes where it stopped), then draws mean ± standard error (ddof 1) over seeds.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import embedded_dataset  # noqa: E402
import evaluate  # noqa: E402
import listings  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from losses import STRATEGIES, faulty_positive_weights, soft_targets, softening_scores  # noqa: E402

PANELS = [("ucf", "finetune_video_top1", "UCF fine-tune (video top-1)"),
          ("ucf", "R@5", "UCF retrieval R@5"),
          ("hmdb", "finetune_video_top1", "HMDB fine-tune (video top-1)"),
          ("hmdb", "R@5", "HMDB retrieval R@5")]
QUICK_SETTINGS = {
    "delta": dict(seeds=[0, 1], epochs=12, eval_clips=2, ft_repeats=1, deltas=[-1.0], n0=[0.5],
                  oracle=False, runs="runs/sweeps_quick", out="figures/quick/fig1_delta_sweep"),
    "lambda": dict(seeds=[0, 1], epochs=12, eval_clips=2, ft_repeats=1, lams=[0.0, 0.5, 1.0],
                   oracle=False, runs="runs/sweeps_quick", out="figures/quick/fig2_lambda_sweep")}
QUICK = {"delta": "xID and Weighted-xID (δ = -1) at n₀ = 0.5, xID at n₀ = 0, 2 seeds, 12 epochs",
         "lambda": "λ ∈ {0, 0.5, 1}, 2 seeds, 12 epochs"}
QUICK_TITLE = " (--quick: a trial of the sweep, not a finding)"
MARKERS, STYLES = ["o", "s", "^", "D", "v"], ["-", "--", ":", "-."]


def save(fig, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=130, bbox_inches="tight")
    fig.savefig(out.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out.with_suffix('.png')} and .pdf")


# ----------------------------------------------------------------------------------------------
# Sweeps: train + evaluate the missing grid points, then draw
# ----------------------------------------------------------------------------------------------
def metric(results, dataset, name):
    r = results[dataset]
    return r["retrieval"][name] if name.startswith("R@") else r[name]


def point_flags(run_dir, train_flags, args):
    """train.py's flags for one grid point: the sweeps' recipe (the paper's per-step bank refresh;
    train.py's quick start refreshes per epoch) and the point's own."""
    return ["--embedded-root", args.embedded_root, "--out", str(run_dir),
            "--epochs", str(args.epochs), "--no-eval", "--warmup-epochs", str(args.warmup_epochs),
            "--workers", str(args.workers), "--bank-refresh", "step", *train_flags]


def check_recipe(run_dir, train_flags, args):
    """A point trained with other flags than this sweep's (any that train.py's --resume keeps), or
    for more epochs, stops the sweep, naming it: a figure must not mix two recipes."""
    saved = run_dir / "args.json"
    if not saved.exists():
        return
    was = json.loads(saved.read_text())
    resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
    _, want = train.get_args(point_flags(run_dir, train_flags, args) + resume)
    differ = {k: (was.get(k, "(not recorded)"), v) for k, v in vars(want).items()
              if k not in train.RESUMABLE_FLAGS and was.get(k, "(not recorded)") != v}
    if was.get("epochs", 0) > args.epochs:
        differ["epochs"] = (was["epochs"], args.epochs)
    if differ:
        raise SystemExit(f"{run_dir} was trained with other flags than this sweep's "
                         + ", ".join(f"--{k.replace('_', '-')} {a} (the sweep: {b})"
                                     for k, (a, b) in differ.items())
                         + ": delete it, or give another --runs")


def finished_results(run_dir, train_flags, args):
    """The point's results.json if it is complete for this sweep's settings, else None (a point
    of another recipe stops the sweep: check_recipe)."""
    check_recipe(run_dir, train_flags, args)
    res = run_dir / "results.json"
    if res.exists():
        r = json.loads(res.read_text())
        if (r.get("evaluated_epoch") == args.epochs and "ucf" in r and "hmdb" in r
                and r.get("protocol") is not None  # a protocol without roots: the embedded sets
                and {"ucf_root": None, "hmdb_root": None, **r["protocol"]}
                == evaluate_protocol(run_dir, args)):
            return r
    return None


def evaluate_flags(run_dir, args):
    return [str(run_dir), "--skip", "pretrain", "--workers", str(args.workers),
            "--clips", str(args.eval_clips), "--ft-repeats", str(getattr(args, "ft_repeats", 1))]


def evaluate_protocol(run_dir, args):
    """The protocol evaluate.py records for this sweep's flags, evaluate.py's defaults included."""
    return evaluate.protocol(evaluate.parser().parse_args(evaluate_flags(run_dir, args)))


def train_and_evaluate_point(run_dir, train_flags, args):
    """Train and evaluate one grid point unless its results are complete; resume a half-done one."""
    done_results = finished_results(run_dir, train_flags, args)
    if done_results:
        return done_results
    ckpt = run_dir / "checkpoint.pt"
    done = runs.load_checkpoint(ckpt)["epoch"] + 1 if ckpt.exists() else 0
    if done < args.epochs:
        train.main(point_flags(run_dir, train_flags, args) + (["--resume"] if done else []))
    return evaluate.main(evaluate_flags(run_dir, args))


def sweep(kind, args):
    """Every grid point: {key: results}. Before each point a line says which of how many it is and,
    from the points trained so far in this call, when the sweep will end."""
    root = Path(args.runs) / kind
    embedded_dataset.ensure(args.embedded_root)
    points = []  # (key, run folder, train.py flags)
    if kind == "delta":
        # xID at every n₀, and at n₀ = 0 as the reference without injection and, with --oracle,
        # Weighted-xID with the ground truth's weights (injected pairs at w_min, and at 0)
        grid = ([(n0, d) for n0 in args.n0 for d in args.deltas]
                + [(n0, "xid") for n0 in sorted({0.0, *args.n0})])
        grid += [(n0, o) for n0 in args.n0 if n0 > 0 for o in ORACLES] if args.oracle else []
        for seed in args.seeds:
            for n0, d in grid:
                flags = (["--mode", "xid"] if d == "xid" else
                         ["--mode", "weighted", "--oracle-weights", d] if d in ORACLES else
                         ["--mode", "weighted", "--delta", str(d)])
                name = f"n0_{n0:g}_{d if isinstance(d, str) else f'delta_{d:g}'}_seed{seed}"
                points.append(((n0, d, seed), root / name,
                               flags + ["--n0", str(n0), "--seed", str(seed)]))
    else:
        for seed in args.seeds:
            for lam in args.lams:
                flags = ["--mode", "soft", "--strategy", "cycle", "--lam", str(lam),
                         "--seed", str(seed)]
                points.append(((lam, seed), root / f"lam_{lam:g}_seed{seed}", flags))
                if args.oracle and lam > 0:  # the ground truth's targets at the same λ
                    points.append(((lam, "oracle", seed), root / f"lam_{lam:g}_oracle_seed{seed}",
                                   ["--mode", "soft", "--oracle-targets", "class", "--lam",
                                    str(lam), "--seed", str(seed)]))
    to_train = [run_dir for _, run_dir, flags in points
                if not finished_results(run_dir, flags, args)]
    print(f"sweep {kind}: {len(points)} points, {len(points) - len(to_train)} already done, "
          f"{len(to_train)} to train and evaluate", flush=True)
    t0 = time.perf_counter()
    if getattr(args, "jobs", 1) > 1 and to_train:
        run_points_at_once(kind, [(d, f) for _, d, f in points if d in to_train], args)
        to_train = []  # their results are complete now: the loop below reads them
    table, trained = {}, 0
    for k, (key, run_dir, flags) in enumerate(points):
        if run_dir in to_train:
            left = len(to_train) - trained
            eta = (f", about {(time.perf_counter() - t0) / trained * left / 60:.0f} min left for "
                   f"the sweep" if trained else "")
            print(f"sweep {kind}: point {k + 1}/{len(points)} ({run_dir.name}), {left} to go{eta}",
                  flush=True)
        table[key] = train_and_evaluate_point(run_dir, flags, args)
        trained += run_dir in to_train
    print(f"sweep {kind}: done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return table


def run_points_at_once(kind, todo, args):
    """Train and evaluate the points in args.jobs processes at once, each point a process of its
    own (`python -c` calling train_and_evaluate_point; its output appended to RUN/sweep.log). On one
    GPU the small encoders leave most of it idle, so points share it; on a CPU the cores are split
    between them (OMP_NUM_THREADS). A point that fails stops the sweep, named with its log; the
    sweep stopped (Ctrl-C, an error) stops the points it started."""
    jobs = args.jobs
    threads = max(1, listings.available_cores() // (jobs * (1 + args.workers)))
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    keep = {k: getattr(args, k) for k in ("epochs", "warmup_epochs", "workers", "eval_clips", "ft_repeats")}
    keep["embedded_root"] = str(Path(args.embedded_root).resolve())  # the children may start elsewhere
    code = ("import argparse, json, pathlib, sys; import plots; a = json.loads(sys.argv[1]); "
            "plots.train_and_evaluate_point(pathlib.Path(a['run']), a['flags'], argparse.Namespace(**a['args']))")
    waiting, running, took = list(todo), [], []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                run_dir, flags = waiting.pop(0)
                run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run_dir / "sweep.log", "a")
                proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(
                    {"run": str(run_dir.resolve()), "flags": flags, "args": keep})], env=env, stdout=log,
                    stderr=subprocess.STDOUT)
                running.append((proc, run_dir, log, time.perf_counter()))
                print(f"sweep {kind}: started {run_dir.name} ({len(running)} running, {len(waiting)} "
                      f"waiting, {jobs} at once, {threads} threads each)", flush=True)
            time.sleep(0.5)
            for item in [r for r in running if r[0].poll() is not None]:
                proc, run_dir, log, started = item
                running.remove(item)
                log.close()
                if proc.returncode != 0:
                    tail = (run_dir / "sweep.log").read_text()[-2000:]
                    raise SystemExit(f"sweep {kind}: {run_dir.name} failed (exit {proc.returncode}); "
                                     f"its output is in {run_dir / 'sweep.log'}:\n{tail}")
                took.append(time.perf_counter() - started)
                # what is left: the waiting points in rounds of `jobs`, and the running ones half done
                left = np.mean(took) * (len(waiting) / jobs + 0.5 * bool(running))
                print(f"sweep {kind}: {run_dir.name} done in {took[-1] / 60:.1f} min, {len(took)} of "
                      f"{len(todo)}, about {left / 60:.0f} min left", flush=True)
    finally:
        for proc, _, log, _ in running:  # stopped early: no point may train on without the sweep
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def mean_and_spread(ys):
    """ys (points, seeds) -> mean and standard error of the mean over the seeds of each point: the
    sample std (ddof 1; the population std would understate it by √2 with two seeds) over √seeds.
    Two means whose bars overlap are not told apart; a 95% interval is t(seeds−1) standard errors
    (4.3 with 3 seeds), as RESULTS.md gives them."""
    n = ys.shape[1]
    return ys.mean(1), ys.std(1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(len(ys))


def draw_sweep(x, lines, xlabel, title, out, extra=None):
    """Four PANELS; lines: [(label, style, marker, {x: [results of each seed]}[, colour])]."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for ax, (ds, name, panel) in zip(axes, PANELS):
        for label, style, marker, results, *colour in lines:
            ys = np.array([[metric(r, ds, name) for r in results[v]] for v in x])
            if marker:
                ax.errorbar(x, *mean_and_spread(ys), marker=marker, ls=style,
                            color=(colour or ["k"])[0], capsize=3, label=label)
            else:  # a baseline that does not depend on x
                ax.axhline(ys.mean(), ls=style, color=(colour or ["0.6"])[0], lw=1.5, alpha=0.7,
                           label=label)
        if extra:
            extra(ax)
        ax.set_xlabel(xlabel)
        ax.set_title(panel, fontsize=10)
    axes[0].set_ylabel("accuracy / recall")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # never over data
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, out)


ORACLES = ("w-min", "zero")  # train.py --oracle-weights
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
ORACLE_STYLES = ("-.", (0, (1, 1)))  # w-min, zero


def draw_delta(table, args, out):
    lines = []
    for k, n0 in enumerate(args.n0):
        colour = COLOURS[k % len(COLOURS)]  # per n₀: its Weighted-xID, xID and oracle lines alike
        for o in ORACLES if args.oracle and n0 > 0 else ():
            lines.append((f"injected-pair oracle ({'w_min' if o == 'w-min' else '0'} on injected), "
                          f"n₀ = {n0:g}", ORACLE_STYLES[ORACLES.index(o)], None,
                          {d: [table[(n0, o, s)] for s in args.seeds] for d in args.deltas},
                          colour))
        lines.append((f"Weighted-xID, n₀ = {n0:g}", "-", MARKERS[k],
                      {d: [table[(n0, d, s)] for s in args.seeds] for d in args.deltas}, colour))
        lines.append((f"xID, n₀ = {n0:g}", "--", None,
                      {d: [table[(n0, "xid", s)] for s in args.seeds] for d in args.deltas},
                      colour))
    if 0.0 not in args.n0:
        lines.append(("xID, no injection", ":", None,
                      {d: [table[(0.0, "xid", s)] for s in args.seeds] for d in args.deltas}))
    draw_sweep(args.deltas, lines, "δ (mid-point of W at μ + δσ)",
               f"Figure 1 on the embedded data: δ sweep (w_min = 0.25, κ = 0.5), mean ± standard "
               f"error (ddof 1) over {len(args.seeds)} seeds, {args.epochs} epochs"
               + QUICK_TITLE * bool(getattr(args, "quick", False)), out)


def draw_lambda(table, args, out):
    def paper(ax):
        ax.axvspan(0.25, 0.5, color="0.9", label="paper's best λ")
        ax.axvline(0.65, color="0.5", ls=":", label="paper: collapse above")
    lines = [("Soft-xID, cycle", "-", "o",
              {lam: [table[(lam, s)] for s in args.seeds] for lam in args.lams})]
    if args.oracle:  # at λ = 0 both are xID: the same runs
        lines.append(("Soft-xID, class oracle (S from the labels)", "-.", "s",
                      {lam: [table[(lam, "oracle", s) if lam > 0 else (lam, s)]
                             for s in args.seeds] for lam in args.lams}, "tab:green"))
    draw_sweep(args.lams, lines, "λ (soft-target mixing)",
               f"Figure 2 on the embedded data: λ sweep of Soft-xID (cycle targets), mean ± "
               f"standard error (ddof 1) over {len(args.seeds)} seeds, {args.epochs} epochs"
               + QUICK_TITLE * bool(getattr(args, "quick", False)), out, extra=paper)


# ----------------------------------------------------------------------------------------------
# Figures of one run
# ----------------------------------------------------------------------------------------------
def per_class(run_dir, out, n=40):
    """Figure 3: per-class R@1 on the pre-training set, best and worst classes."""
    r = json.loads((Path(run_dir) / "results.json").read_text())["per_class_R@1"]
    ranked = sorted(r.items(), key=lambda kv: -kv[1])
    parts = ([(f"all {len(ranked)}, best to worst", ranked)] if len(ranked) <= n
             else [(f"best {n}", ranked[:n]), (f"worst {n}", ranked[-n:])])
    fig, axes = plt.subplots(len(parts), 1, figsize=(max(6, 0.35 * len(parts[0][1])),
                                                     3.2 * len(parts)), squeeze=False)
    for ax, (what, items) in zip(axes[:, 0], parts):
        ax.bar(range(len(items)), [v for _, v in items], color="0.4")
        ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("R@1")
        ax.set_ylim(0, 1)
        ax.set_title(f"Figure 3: per-class R@1 on the pre-training set ({what} classes)",
                     fontsize=10)
    fig.tight_layout()
    save(fig, out)


def retrieval_grid(run_dir, out):
    """Figure 4: each row a query (left) and its four nearest training videos."""
    r = json.loads((Path(run_dir) / "results.json").read_text())["top4_retrievals"]
    frames = np.load(Path(run_dir) / "retrievals.npz")["frames"]
    fig, axes = plt.subplots(len(r), 5, figsize=(8, 1.75 * len(r)), squeeze=False)
    for row, (items, imgs) in enumerate(zip(r, frames)):
        for col, (item, img) in enumerate(zip(items, imgs)):
            ax = axes[row, col]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            right = col == 0 or item["class"] == items[0]["class"]
            ax.set_title(("query: " if col == 0 else "") + item["class"].replace("_", " "),
                         fontsize=7, fontweight="normal" if right else "bold",
                         style="normal" if right else "italic")
    fig.suptitle("Figure 4: top-4 retrievals (wrong class in bold italics)", fontsize=10)
    fig.tight_layout()
    save(fig, out)


def weights_applied(run_args):
    """The weights a run's loss applied to its positive pairs: "W(s)" (Weighted-xID), "oracle" (the
    ground truth's, --oracle-weights) or None (xID and Soft-xID weight nothing)."""
    if run_args.get("mode") not in ("weighted", "robust"):
        return None
    return "W(s)" if run_args.get("oracle_weights", "off") == "off" else "oracle"


def score_histogram(run_dir, out, deltas=(-2, -1, 0)):
    """Alignment scores s_i of clean and injected pairs, with W(s) drawn over them for the run's own
    δ, κ and w_min, and for a few other δ at the run's κ and w_min."""
    ckpt = runs.load_checkpoint(Path(run_dir) / "checkpoint.pt")
    run = ckpt["args"]
    kappa, w_min = run["kappa"], run["w_min"]
    weighted = weights_applied(run) == "W(s)"  # elsewhere W(s) is drawn as "what if"
    deltas = sorted({*deltas, run["delta"]} if weighted else set(deltas))
    s = ckpt["criterion"]["bank.s"]
    injected = torch.from_numpy(data.injected_mask(ckpt["injected_pairs"], len(s)))
    natural = embedded_dataset.natural_faulty_flags([data.Video(p) for p in ckpt["videos"]])
    natural = (torch.zeros_like(injected) if natural is None
               else torch.from_numpy(natural) & ~injected)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bins = np.linspace(float(s.min()), float(s.max()), 40)
    clean = ~injected & ~natural
    ax.hist(s[clean].numpy(), bins, color="0.75", label=f"clean pairs ({int(clean.sum())})")
    if injected.any():
        ax.hist(s[injected].numpy(), bins, histtype="step", color="k", lw=2,
                label=f"injected ({int(injected.sum())})")
    if natural.any():
        ax.hist(s[natural].numpy(), bins, histtype="step", color="k", ls=":", lw=2,
                label=f"natural faulty ({int(natural.sum())})")
    ax.set_xlabel("alignment score s_i = v̄_i·ā_i")
    ax.set_ylabel("instances")
    w_ax = ax.twinx()
    mu, sigma = s.mean(), s.std()
    grid = torch.linspace(float(s.min()), float(s.max()), 200)
    for k, d in enumerate(deltas):
        w_ax.plot(grid, faulty_positive_weights(grid, mu, sigma, d, kappa, w_min), color="k",
                  ls=STYLES[k % 4], lw=2 if weighted and d == run["delta"] else 1,
                  label=f"W(s), δ = {d:g}" + (" (the run's)" if weighted and d == run["delta"]
                                              else ""))
    w_ax.set_ylim(0, 1.05)
    w_ax.set_ylabel("weight W(s)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = w_ax.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax.set_title(f"scores at the end of the run (n₀ = {run['n0']:g}, {run['mode']}); "
                 f"W(s) with w_min = {w_min:g}, κ = {kappa:g}"
                 + ("" if weighted else " (not applied in this run)"), fontsize=10)
    fig.tight_layout()
    save(fig, out)


def training_curves(run_dir, out):
    """Losses, mean weight and detection AUC per epoch, from log.jsonl."""
    ep = runs.epoch_records(run_dir)
    x = [r["epoch"] for r in ep]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key, ls in (("loss_v2a", "-"), ("loss_a2v", "--")):
        axes[0].plot(x, [r[key] for r in ep], "k" + ls, label=key.replace("_", " "))
    axes[0].set_title("loss per direction")
    applied = weights_applied(json.loads((Path(run_dir) / "args.json").read_text())
                              if (Path(run_dir) / "args.json").exists() else {})
    axes[1].plot(x, [r["w_mean"] for r in ep], "k-", label="mean W(s) over all slots")
    axes[1].plot(x, [r["w_share_below_half"] for r in ep], "k--", label="share with W(s) < 0.5")
    if applied:  # what the loss applied: 1 in the warm-up, then W(s) or the oracle's weights
        axes[1].plot(x, [r["batch_mean_weight"] for r in ep], color="tab:blue",
                     label="mean weight applied")
    axes[1].set_title("weights" + {"W(s)": "", "oracle": " (the oracle's applied, not W(s))",
                                   None: " (W(s) not applied in this run)"}[applied])
    for key, ls, label in (("injected_auc", "-", "injected"), ("natural_auc", ":", "natural")):
        if key in ep[-1]:
            axes[2].plot(x, [r.get(key, np.nan) for r in ep], "k" + ls, label=label)
    axes[2].axhline(0.5, color="0.6", lw=1)
    axes[2].set_title("faulty-positive detection ROC AUC")
    warm = [r["epoch"] for r in ep if r["warmup"]]
    for ax in axes:
        if warm:
            ax.axvspan(0.5, max(warm) + 0.5, color="0.92")
        ax.set_xlabel("epoch (shaded: warm-up, plain xID)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out)


def chance_loss(run):
    """The loss of a flat softmax, 2 ln(K + 1), with K as train.py chose it for the run."""
    n = json.loads((Path(run) / "injection.json").read_text())["num_instances"]
    asked = json.loads((Path(run) / "args.json").read_text())["num_negatives"]
    return 2 * np.log(train.num_negatives(asked, n) + 1)


def run_line(run, ep, chance, below=0.3):
    """One run in a line: the epoch its loss first fell `below` under chance (where it left the
    plateau), the last epoch's loss and detection, and its transfer where evaluate.py ran. With
    injected pairs the loss read is the clean pairs' own: the injected pairs' loss rises above
    chance as the clean half is learned, so the mean can hide the plateau's end."""
    clean = "loss_clean_pairs" in ep[-1]
    key, name = ("loss_clean_pairs", "clean pairs' loss") if clean else ("loss", "loss")
    left = next((r["epoch"] for r in ep if r[key] < chance - below), None)
    last = ep[-1]
    line = (f"{run}: {name} {below} below chance from epoch "
            f"{left if left else f'- (not in {len(ep)})'}, epoch {last['epoch']} loss "
            f"{last['loss']:.3f}" + (f" (clean pairs {last[key]:.3f})" if clean else "")
            + f" (chance {chance:.2f})")
    for key in ("injected_auc", "natural_auc"):
        if key in last:
            line += f", {key.split('_')[0]} AUC {last[key]:.2f}"
    res = Path(run) / "results.json"
    r = json.loads(res.read_text()) if res.exists() else {}
    for ds in ("ucf", "hmdb"):
        if ds in r:
            line += (f", {ds.upper()} R@5 {metric(r, ds, 'R@5'):.3f} "
                     f"ft {metric(r, ds, 'finetune_video_top1'):.3f}")
    return line


def compare_curves(groups, out):
    """Per-epoch xID loss and detection ROC AUC of groups of runs ({label: [run folders]}), one line
    per run, a colour per group: how soon each recipe learns, seed by seed. Prints each run's line
    (run_line)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    chance = None
    colours = ("tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    if len(groups) > len(colours):
        raise ValueError(f"at most {len(colours)} groups, got {len(groups)}")
    for (label, folders), colour in zip(groups.items(), colours):
        for k, run in enumerate(folders):
            ep = runs.epoch_records(run)
            if not ep:
                raise ValueError(f"{run}: its log.jsonl has no epoch yet")
            x = [r["epoch"] for r in ep]
            axes[0].plot(x, [r["loss"] for r in ep], color=colour, lw=1,
                         label=label if k == 0 else None)
            key = "injected_auc" if "injected_auc" in ep[-1] else "natural_auc"
            axes[1].plot(x, [r.get(key, np.nan) for r in ep], color=colour, lw=1,
                         label=f"{label} ({key.split('_')[0]})" if k == 0 else None)
            own = chance_loss(run)  # each run's own K; the first run's is the one drawn
            print(f"{label}: {run_line(run, ep, own)}")
            chance = own if chance is None else chance
    if chance is not None:
        axes[0].axhline(chance, color="0.6", lw=1, ls=":", label="chance, 2 ln(K+1)")
    axes[0].set_title("xID loss per epoch")
    axes[1].axhline(0.5, color="0.6", lw=1, ls=":")
    axes[1].set_title("faulty-positive detection ROC AUC")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out)


def soft_target_map(run_dir, out, per_class=6, lam=None, strategy=None):
    """T(j|i) of Soft-xID between instances sorted by class, computed from a run's memory banks by
    losses.py's functions: each row's positive on the diagonal, and the mass the soft targets move
    off it, which lands in the row's own class block where it finds faulty negatives."""
    ckpt = runs.load_checkpoint(Path(run_dir) / "checkpoint.pt")
    run_args = ckpt["args"]
    if run_args.get("oracle_targets", "off") != "off":  # its targets came from the labels
        print(f"{run_dir} trained with the class oracle's targets; drawn here: what "
              f"S(j|i) ({strategy or run_args['strategy']}) gives from its banks")
    lam = lam if lam is not None else (
        run_args["lam"] if run_args["mode"] in ("soft", "robust") and run_args["lam"] > 0 else 0.5)
    strategy = strategy or run_args["strategy"]
    labels = np.array([label for _, label, _ in ckpt["instances"]])
    classes = np.unique(labels)
    pick = torch.from_numpy(np.concatenate([np.flatnonzero(labels == c)[:per_class]
                                            for c in classes]))
    v_bar, a_bar = (ckpt["criterion"]["bank.v_bar"][pick].float(),
                    ckpt["criterion"]["bank.a_bar"][pick].float())
    own = torch.eye(len(pick), dtype=torch.bool)  # candidates: all picked but the row's own
    S_v, _ = softening_scores(strategy, v_bar, a_bar, v_bar, a_bar, run_args["tau_s"], mask=own)
    T = soft_targets(S_v, lam)    # (M, 1 + M), column 0 the positive
    grid = T[:, 1:].clone()
    grid[own] = T[:, 0]           # (M, M), row i: T(j|i)
    same = torch.from_numpy(labels[pick][:, None] == labels[pick][None, :]) & ~own
    moved = grid.masked_fill(own, 0)  # λ = 0 moves nothing: the share is then nan
    share = (moved[same].sum() / moved.sum()).item() if moved.sum() > 0 else float("nan")

    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    im = ax.imshow(grid.numpy(), cmap="magma_r", norm=matplotlib.colors.LogNorm(vmin=1e-3, vmax=1))
    ends = np.cumsum([min(per_class, int((labels == c).sum())) for c in classes])  # some have fewer
    for end in ends[:-1]:
        ax.axhline(end - 0.5, color="tab:blue", lw=0.6)
        ax.axvline(end - 0.5, color="tab:blue", lw=0.6)
    names = ckpt.get("classes") or [str(c) for c in classes]
    ticks = (np.r_[0, ends[:-1]] + ends - 1) / 2
    ax.set_xticks(ticks, [names[c] for c in classes], rotation=90, fontsize=6)
    ax.set_yticks(ticks, [names[c] for c in classes], fontsize=6)
    ax.set_xlabel("candidate j")
    ax.set_ylabel("instance i")
    ax.set_title(f"soft targets T(j|i), {strategy}, λ = {lam:g} ({per_class} instances a class)\n"
                 f"mass moved off the diagonal that stays in the class: {share:.0%} "
                 f"(the class's share of candidates: "
                 f"{same.float().sum().item() / (~own).sum().item():.0%})", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="T(j|i) (log scale)")
    fig.tight_layout()
    save(fig, out)
    return share


def embedded_clip(root, rel, out, frames=12):
    """A frame strip over the log-mel spectrogram of the same seconds, wall hits marked on both."""
    params = json.loads((Path(root) / "embedded.json").read_text())
    events = json.loads((Path(root) / "events.json").read_text())[rel]
    seconds, rate = params["seconds"], params["rate"]
    spec = data.ClipSpec(frames=frames, fps=frames / seconds, audio_seconds=seconds,
                         sample_rate=rate)
    strip, wave = data.decode_clip(Path(root) / rel, 0.0, spec)
    # the encoder's input, finer
    logmel = data.log_mel(data.mel_spectrogram(rate, n_mels=64), torch.from_numpy(wave)).numpy()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4.2),
                                      gridspec_kw={"height_ratios": [1, 1.3]})
    top.imshow(np.concatenate(list(strip), axis=1), extent=(0, seconds, 0, seconds / frames))
    top.set_yticks([])
    top.set_title(f"{rel.split('/')[2]}: {frames} frames over {seconds:g} s (one instance)")
    bottom.imshow(logmel, origin="lower", aspect="auto", cmap="gray_r",
                  extent=(0, seconds, 0, logmel.shape[0]))
    bottom.set_ylabel("mel bin")
    bottom.set_xlabel("time (s)")
    for ax in (top, bottom):
        for e in events:
            ax.axvline(e, color="k", ls="--", lw=1)
    bottom.set_title("log-mel spectrogram: a click and a decaying tone at each wall hit (dashed)")
    fig.tight_layout()
    save(fig, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sweeps = {}
    for kind in ("delta", "lambda"):
        s = sweeps[kind] = sub.add_parser(kind, help=f"the {kind} sweep: train/evaluate missing "
                                          f"points, draw the figure")
        s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                       help="seeds per grid point")
        s.add_argument("--epochs", type=int, default=24, help="pre-training epochs per point")
        s.add_argument("--warmup-epochs", type=int, default=3, help="plain-xID epochs first")
        s.add_argument("--runs", default="runs/sweeps", help="where the runs of the sweep live")
        s.add_argument("--embedded-root", default="data/embedded", help="the embedded dataset")
        s.add_argument("--workers", type=int, default=2, help="data-loading processes (per point)")
        s.add_argument("--jobs", type=int, default=1,
                       help="points trained at once, each in a process of its own: on one GPU "
                            "4-8 (the small encoders use a sliver of it), with --workers such that "
                            "jobs x workers is about the cores; on 2 CPU cores 1")
        s.add_argument("--eval-clips", type=int, default=3, help="clips per video in evaluation "
                       "(protocol: 10; 3 keeps a sweep's evaluation short on 2 CPU cores)")
        s.add_argument("--ft-repeats", type=int, default=2, help="fine-tunings averaged per point "
                       "(evaluate.py --ft-repeats): one alone is noisy on the small sets")
        s.add_argument("--out", default=f"figures/fig{1 if kind == 'delta' else 2}_{kind}_sweep")
        if kind == "delta":
            s.add_argument("--deltas", type=float, nargs="+", default=[-2.0, -1.0, 0.0],
                           help="δ grid")
            s.add_argument("--n0", type=float, nargs="+", default=[0.25, 0.5],
                           help="one line per n₀ (xID without injection is always trained as "
                                "the reference)")
            s.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                           help="also Weighted-xID with the ground truth's weights at each n₀ "
                                "(train.py --oracle-weights w-min and zero): what a perfect "
                                "detector of the injected pairs would win")
        else:
            s.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                           help="λ grid")
            s.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                           help="also Soft-xID with the ground truth's targets at each λ > 0 "
                                "(train.py --oracle-targets class): what softening the faulty "
                                "negatives perfectly would win")
        s.add_argument("--quick", action="store_true",
                       help=f"a small version that runs in minutes on 2 CPU cores, to try the "
                            f"sweep (and its progress lines) before the long one: {QUICK[kind]}; "
                            f"its runs and figure go elsewhere (runs/sweeps_quick, "
                            f"figures/quick/). Too short and small to show the paper's findings")
    r = sub.add_parser("run", help="Figures 3-4, score histogram and training curves of one "
                       "evaluated run")
    r.add_argument("run_dir")
    r.add_argument("--out", default="figures", help="output folder")
    c = sub.add_parser("curves", help="per-epoch loss and detection AUC of groups of runs, "
                       "overlaid")
    c.add_argument("groups", nargs="+", metavar="LABEL=RUN[,RUN...]",
                   help="a label and its run folders")
    c.add_argument("--out", default="figures/curves", help="output path without extension")
    m = sub.add_parser("targets", help="the soft targets T(j|i) between instances sorted by class, "
                       "from a run's banks")
    m.add_argument("run_dir")
    m.add_argument("--per-class", type=int, default=6, help="instances drawn from each class")
    m.add_argument("--lam", type=float,
                   help="λ (default: the run's, or 0.5 for a run without soft targets)")
    m.add_argument("--strategy", choices=STRATEGIES, help="softening strategy (default: the run's)")
    m.add_argument("--out", default="figures/soft_targets", help="output path without extension")
    t = sub.add_parser("embedded-clip", help="frame strip + spectrogram of one embedded clip")
    t.add_argument("--embedded-root", default="data/embedded",
                   help="the embedded dataset (written if missing)")
    t.add_argument("--clip", default="kinetics/train/triangle_diagonal/emb020001_000000_000003.mp4",
                   help="clip path relative to --embedded-root")
    t.add_argument("--out", default="figures/embedded_clip", help="output path without extension")
    args = p.parse_args(argv)
    if getattr(args, "quick", False):  # the quick grid as defaults: every flag given still wins
        sweeps[args.cmd].set_defaults(**QUICK_SETTINGS[args.cmd])
        args = p.parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.cmd == "delta":
        draw_delta(sweep("delta", args), args, args.out)
    elif args.cmd == "lambda":
        draw_lambda(sweep("lambda", args), args, args.out)
    elif args.cmd == "run":
        run, out = Path(args.run_dir), Path(args.out)
        if not (run / "results.json").exists():
            p.error(f"{run} has no results.json: run `python evaluate.py {run}` first")
        per_class(run, out / "fig3_per_class_r1")
        retrieval_grid(run, out / "fig4_retrievals")
        score_histogram(run, out / "score_histogram")
        training_curves(run, out / "training_curves")
    elif args.cmd == "curves":
        groups = {}
        for g in args.groups:
            label, _, runs = g.rpartition("=")  # labels may hold "=" (n₀ = 0.5), paths rarely do
            folders = [Path(r) for r in runs.split(",") if r]
            missing = [str(f) for f in folders if not (f / "log.jsonl").exists()]
            if not label or not folders or missing:
                p.error(f"{g!r}: expected LABEL=RUN[,RUN...] with a log.jsonl in each run" +
                        (f" (none in {', '.join(missing)})" if missing else ""))
            groups[label] = folders
        try:
            compare_curves(groups, args.out)
        except ValueError as e:
            p.error(str(e))
    elif args.cmd == "targets":
        if not (Path(args.run_dir) / "checkpoint.pt").exists():
            p.error(f"{args.run_dir} has no checkpoint.pt: give a folder of train.py")
        share = soft_target_map(args.run_dir, args.out, args.per_class, args.lam, args.strategy)
        print(f"of the target mass moved off the positives, {share:.0%} lands on candidates of "
              f"the row's own class")
    else:
        embedded_dataset.ensure(args.embedded_root,
                                downstream=not args.clip.startswith("kinetics/"))
        embedded_clip(args.embedded_root, args.clip, args.out)


if __name__ == "__main__":
    main()
