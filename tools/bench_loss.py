"""The loss alone, forward + backward, for each mode at paper-scale shapes: what Weighted-,
Soft- and Robust-xID cost over xID.

    python tools/bench_loss.py                     # B = 64, d = 128, N = 240,000, K = 1024 and 8192
    python tools/bench_loss.py --strategy swapped  # another softening strategy for soft / robust

Random unit embeddings and slots; the median of --repeats runs after 3 untimed ones.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules
from losses import MODES, STRATEGIES, RobustXIDLoss  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="B, embeddings per step")
    p.add_argument("--dim", type=int, default=128, help="d, embedding size")
    p.add_argument("--instances", type=int, default=240_000, help="N, bank slots (Kinetics ~240k)")
    p.add_argument("--negatives", type=int, nargs="+", default=[1024, 8192],
                   help="K values to time")
    p.add_argument("--repeats", type=int, default=30,
                   help="timed runs per setting; the median is shown")
    p.add_argument("--strategy", choices=STRATEGIES, default="cycle",
                   help="softening strategy of soft/robust")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    print(f"device={dev} threads={torch.get_num_threads()} B={args.batch} d={args.dim} "
          f"N={args.instances} strategy={args.strategy}")
    print(f"{'K':>6} {'mode':>9} {'median ms':>10} {'x xid':>6}")
    for K in args.negatives:
        base = None
        for mode in MODES:
            crit = RobustXIDLoss(args.instances, args.dim, mode=mode, num_negatives=K,
                                 strategy=args.strategy).to(dev)
            times = []
            for r in range(args.repeats + 3):
                v = F.normalize(torch.randn(args.batch, args.dim, device=dev),
                                dim=1).requires_grad_()
                a = F.normalize(torch.randn(args.batch, args.dim, device=dev),
                                dim=1).requires_grad_()
                index = torch.randint(args.instances, (args.batch,), device=dev)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss, _ = crit(v, a, index)
                loss.backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if r >= 3:  # first runs warm up the allocator
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times) * 1e3
            base = base or med
            print(f"{K:>6} {mode:>9} {med:>10.2f} {med / base:>6.2f}")


if __name__ == "__main__":
    main()
