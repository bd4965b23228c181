"""Every quantity of the Robust-xID loss for a batch small enough to check on paper.

    python course/worked_example.py

B = 2 instances in the batch, K = 3 shared negatives, d = 2 dimensions, N = 5 bank slots, and
τ = τ_s = 1 so that a logit is just a cosine and e^x can be looked up. The numbers come from the
functions in losses.py that train.py trains with, so the example cannot drift from the code; only
the cycle's two factors are computed here too, one candidate at a time, to be checked by hand.
Slot 2 is a faulty positive: its video and audio point apart.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from losses import (STRATEGIES, RobustXIDLoss, candidate_logits, faulty_positive_weights,  # noqa: E402
                    one_hot_targets, soft_cross_entropy, soft_targets, softening_scores)

TAU = TAU_S = 1.0
DELTA, KAPPA, W_MIN, LAM, MOMENTUM = -1.0, 0.5, 0.25, 0.5, 0.5
# memory banks: v̄ (video) and ā (audio), one row per training instance
V_BAR = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [-0.6, 0.8]])
A_BAR = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.8, -0.6], [0.6, 0.8], [-0.8, 0.6]])
INDEX = torch.tensor([0, 2])              # the batch: instance 0 (a clean pair) and 2 (the faulty one)
NEGATIVES = torch.tensor([1, 3, 4])       # the K negatives, shared by the batch
# the encoders' embeddings of the batch at this step (close to their bank rows)
V = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
A = torch.tensor([[0.6, 0.8], [0.6, -0.8]])


def criterion(mode, strategy="cycle"):
    crit = RobustXIDLoss(len(V_BAR), 2, mode=mode, num_negatives=len(NEGATIVES), tau=TAU, tau_s=TAU_S,
                         bank_momentum=MOMENTUM, delta=DELTA, kappa=KAPPA, w_min=W_MIN, lam=LAM, strategy=strategy)
    crit.bank.v_bar.copy_(V_BAR)
    crit.bank.a_bar.copy_(A_BAR)
    crit.bank.s.copy_((V_BAR * A_BAR).sum(1))
    return crit


def row(name, values, width=7):
    return f"  {name:<28s}" + "".join(f"{float(x):{width}.3f}" for x in values)


def main():
    torch.set_printoptions(precision=3)
    cols = ["i"] + [str(int(j)) for j in NEGATIVES]
    print(__doc__.split("\n\n")[2].strip())
    print(f"\nτ = {TAU}, τ_s = {TAU_S}, δ = {DELTA}, κ = {KAPPA}, w_min = {W_MIN}, λ = {LAM}, bank momentum m = {MOMENTUM}")
    print("\nmemory banks (slot: v̄ | ā | s = v̄·ā)")
    s = (V_BAR * A_BAR).sum(1)
    for n in range(len(V_BAR)):
        print(f"  slot {n}: v̄ = ({V_BAR[n, 0]:+.1f}, {V_BAR[n, 1]:+.1f})  ā = ({A_BAR[n, 0]:+.1f}, {A_BAR[n, 1]:+.1f})  "
              f"s = {s[n]:+.3f}")
    print(f"batch: instances {INDEX.tolist()}, negatives {NEGATIVES.tolist()} (the candidates C_i of row i: "
          f"i itself, then the negatives)")
    for b, i in enumerate(INDEX.tolist()):
        print(f"  v_{i} = ({V[b, 0]:+.1f}, {V[b, 1]:+.1f}), a_{i} = ({A[b, 0]:+.1f}, {A[b, 1]:+.1f})")

    crit = criterion("robust")
    v_pos, a_pos, v_neg, a_neg = V_BAR[INDEX], A_BAR[INDEX], V_BAR[NEGATIVES], A_BAR[NEGATIVES]

    print("\n1. xID: logits v_i·ā_j/τ over j ∈ C_i and P(ā_j|v_i) = softmax_j   (columns: j = " + ", ".join(cols) + ")")
    logits_v = candidate_logits(V, a_pos, a_neg) / TAU
    logits_a = candidate_logits(A, v_pos, v_neg) / TAU
    for b, i in enumerate(INDEX.tolist()):
        print(row(f"v_{i}·ā_j/τ", logits_v[b]))
        print(row(f"P(ā_j|v_{i})", logits_v[b].softmax(0)))
    for b, i in enumerate(INDEX.tolist()):
        print(row(f"a_{i}·v̄_j/τ", logits_a[b]))
        print(row(f"P(v̄_j|a_{i})", logits_a[b].softmax(0)))
    one_hot = one_hot_targets(logits_v)                                   # T(j|i) = 1[j = i]
    xid_rows = soft_cross_entropy(logits_v, one_hot) + soft_cross_entropy(logits_a, one_hot)
    print(row("L_xID(i) = -log P(ā_i|v_i) - log P(v̄_i|a_i)", xid_rows, 8))

    print("\n2. Weighted-xID: s_i over all N slots, μ, σ (sample std), W(s_i)")
    mu, sigma = crit.bank.score_stats()
    w = faulty_positive_weights(s[INDEX], mu, sigma, DELTA, KAPPA, W_MIN)
    print(f"  μ = {mu:.3f}, σ = {sigma:.3f}, mid-point μ + δσ = {mu + DELTA * sigma:.3f}")
    for b, i in enumerate(INDEX.tolist()):
        z = (s[i] - (mu + DELTA * sigma)) / (KAPPA * sigma)
        print(f"  W(s_{i}) = w_min + (1 - w_min)·sigmoid(({s[i]:.3f} - {mu + DELTA * sigma:.3f}) / (κσ = {KAPPA * sigma:.3f})) "
              f"= {W_MIN} + {1 - W_MIN}·sigmoid({z:.3f}) = {w[b]:.3f}")
    print(f"  L = Σ w_i L_xID(i) / Σ w_i = ({w[0]:.3f}·{xid_rows[0]:.3f} + {w[1]:.3f}·{xid_rows[1]:.3f}) / {w.sum():.3f} "
          f"= {(w * xid_rows).sum() / w.sum():.4f}   (xID: mean {xid_rows.mean():.4f})")

    print("\n3. Soft-xID: softening scores S_v(j|i) from the banks, each strategy (columns: j = " + ", ".join(cols) + ")")
    for strategy in STRATEGIES:
        S_v, S_a = softening_scores(strategy, v_pos, a_pos, v_neg, a_neg, TAU_S)
        for b, i in enumerate(INDEX.tolist()):
            print(row(f"{strategy:9s} S_v(j|{i})", S_v[b]))
    S_v, S_a = softening_scores("cycle", v_pos, a_pos, v_neg, a_neg, TAU_S)
    print("  cycle's two factors for S_v, each a softmax over the candidates C_i (the backward one over the v̄'s):")
    factors = []
    for b, i in enumerate(INDEX.tolist()):
        C = [i] + NEGATIVES.tolist()
        forward = (A_BAR[C] @ V_BAR[i] / TAU_S).softmax(0)                                   # P(ā_j|v̄_i)
        back = torch.stack([(V_BAR[C] @ A_BAR[j] / TAU_S).softmax(0)[0] for j in C])         # P(v̄_i|ā_j)
        factors.append((forward, back))
        print(row(f"P(ā_j|v̄_{i})", forward))
        print(row(f"P(v̄_{i}|ā_j)", back))
        print(row("product / its sum = S_v(j|" + str(i) + ")", forward * back / (forward * back).sum()))
    T_v, T_a = soft_targets(S_v, LAM), soft_targets(S_a, LAM)
    print(f"  targets with cycle, T(j|i) = (1 - λ)·1[j = i] + λ·S(j|i), λ = {LAM}:")
    for b, i in enumerate(INDEX.tolist()):
        print(row(f"T_v(j|{i})", T_v[b]))
        print(row(f"T_a(j|{i})", T_a[b]))
    soft_rows = soft_cross_entropy(logits_v, T_v) + soft_cross_entropy(logits_a, T_a)
    print(row("L_Soft(i) = -Σ_j T_v log P(ā_j|v_i) - Σ_j T_a log P(v̄_j|a_i)", soft_rows, 8))

    print("\n4. The four losses as RobustXIDLoss computes them (the module train.py uses)")
    by_hand = {"xid": xid_rows.mean(), "weighted": (w * xid_rows).sum() / w.sum(), "soft": soft_rows.mean(),
               "robust": (w * soft_rows).sum() / w.sum()}
    trained = {}
    for mode in by_hand:
        trained[mode], _ = criterion(mode)(V, A, INDEX, negatives=NEGATIVES)
        print(f"  {mode:9s} L = {trained[mode]:.4f}   (from the rows above: {by_hand[mode]:.4f})")

    print("\n5. The bank update after the step: v̄_i <- normalize(m·v̄_i + (1 - m)·v_i), ā likewise; s_i follows")
    crit.bank.update(INDEX, V, A)
    for i in INDEX.tolist():
        print(f"  slot {i}: v̄ = ({crit.bank.v_bar[i, 0]:+.3f}, {crit.bank.v_bar[i, 1]:+.3f})  "
              f"ā = ({crit.bank.a_bar[i, 0]:+.3f}, {crit.bank.a_bar[i, 1]:+.3f})  s = {crit.bank.s[i]:+.3f}")
    return {"logits_v": logits_v, "P_v": logits_v.softmax(1), "s": s, "mu": mu, "sigma": sigma, "w": w,
            "S_v": S_v, "cycle_factors": factors, "T_v": T_v, "loss_rows_xid": xid_rows, "loss_rows_soft": soft_rows, "by_hand": by_hand,
            "trained": trained, "bank_after": (crit.bank.v_bar.clone(), crit.bank.a_bar.clone())}


if __name__ == "__main__":
    try:
        main()
    except NotImplementedError as err:  # the student edition, before exercises 1-5 are written
        transcript = Path(__file__).with_name("worked_example.txt")
        print(f"\n{err}: this losses.py has exercises still to write, so the example stops here.")
        if transcript.exists():
            print(f"What it prints with the solutions ({transcript.name}):\n")
            print(transcript.read_text())
