"""The losses of losses.py, checked against the equations of METHOD.md.

The reference below is a slow loop written straight from the equations, one instance and one
candidate at a time, in float64; every vectorised result must agree with it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (MODES, STRATEGIES, MemoryBank, RobustXIDLoss, class_oracle_scores,
                    faulty_positive_weights, sample_negatives, soft_cross_entropy, soft_targets,
                    softening_scores)


def show(t):
    return str([round(x, 4) for x in torch.as_tensor(t).detach().double().flatten().tolist()])


def expect_close(yours, expected, what, **tolerance):
    """torch.testing.assert_close with a message that says, in the paper's terms, what the equation
    expected and what came: course/exercises.py's grader prints it to the student."""
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert isinstance(yours, torch.Tensor), f"{what}: expected a tensor, yours is {type(yours).__name__}"
    assert yours.shape == expected.shape, (f"{what}: expected shape {tuple(expected.shape)}, "
                                           f"yours {tuple(yours.shape)}")
    torch.testing.assert_close(yours.detach().float(), expected, **tolerance,
                               msg=lambda _: f"{what}: expected {show(expected)}, yours {show(yours)}")


# ----------------------------------------------------------------------------------------------
# Reference: the equations as loops
# ----------------------------------------------------------------------------------------------
def dot(x, y):
    return float((x.double() * y.double()).sum())


def ref_softening(strategy, i, C, v_bar, a_bar, tau_s):
    """S_v(j|i), S_a(j|i) for j in the candidate list C (C[0] = i), straight from METHOD.md."""
    def softmax(scores):
        z = sum(math.exp(x) for x in scores)
        return [math.exp(x) / z for x in scores]

    def direction(x_bar, y_bar):  # S_x(j|i), with x the querying modality
        if strategy == "bootstrap":
            return softmax([dot(x_bar[i], y_bar[j]) / tau_s for j in C])
        if strategy == "swapped":
            return softmax([dot(y_bar[i], x_bar[j]) / tau_s for j in C])
        if strategy == "neighbor":
            return softmax([dot(x_bar[i], x_bar[j]) / tau_s for j in C])
        # cycle: P(y_j | x_i) · P(x_i | y_j), the latter normalised over the candidate x's
        forward = softmax([dot(x_bar[i], y_bar[j]) / tau_s for j in C])
        back = [math.exp(dot(y_bar[j], x_bar[i]) / tau_s)
                / sum(math.exp(dot(y_bar[j], x_bar[k]) / tau_s) for k in C) for j in C]
        prod = [f * b for f, b in zip(forward, back)]
        return [p / sum(prod) for p in prod]

    return direction(v_bar, a_bar), direction(a_bar, v_bar)


def ref_loss(crit, v, a, index, negatives):
    """L = Σ_i w_i L_Soft(i) / Σ_i w_i by loops; autograd flows through v and a (float64)."""
    bank = crit.bank
    v_bar, a_bar = bank.v_bar.double(), bank.a_bar.double()
    s_all = [dot(v_bar[k], a_bar[k]) for k in range(bank.num_instances)]
    mu = sum(s_all) / len(s_all)
    sigma = math.sqrt(sum((x - mu) ** 2 for x in s_all) / (len(s_all) - 1))
    weighted = crit.mode in ("weighted", "robust")
    lam = crit.lam if crit.mode in ("soft", "robust") else 0.0
    total, total_w = 0.0, 0.0
    for b, i in enumerate(index.tolist()):
        C = [i] + [n for n in negatives.tolist() if n != i]  # i drawn as a negative is no negative
        S_v, S_a = ref_softening(crit.strategy, i, C, v_bar, a_bar, crit.tau_s)
        lv = torch.stack([(v[b].double() * a_bar[j]).sum() / crit.tau for j in C])
        la = torch.stack([(a[b].double() * v_bar[j]).sum() / crit.tau for j in C])
        log_p_v = lv - torch.logsumexp(lv, 0)  # log P(ā_j | v_i)
        log_p_a = la - torch.logsumexp(la, 0)  # log P(v̄_j | a_i)
        L = 0.0
        for c in range(len(C)):
            T_v = (1 - lam) * (c == 0) + lam * S_v[c]
            T_a = (1 - lam) * (c == 0) + lam * S_a[c]
            L = L - T_v * log_p_v[c] - T_a * log_p_a[c]
        w = 1.0
        if weighted:
            x = (s_all[i] - (mu + crit.delta * sigma)) / (crit.kappa * sigma)
            w = crit.w_min + (1 - crit.w_min) / (1 + math.exp(-x))
        total, total_w = total + w * L, total_w + w
    return total / total_w


def structured_bank(crit, seed=0):
    """Fill the banks with clustered, partly aligned vectors, so S and W are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    N, d = crit.bank.v_bar.shape
    centres = torch.randn(4, d, generator=g)
    z = centres[torch.arange(N) % 4] + 0.7 * torch.randn(N, d, generator=g)
    crit.bank.v_bar.copy_(F.normalize(z + 0.5 * torch.randn(N, d, generator=g), dim=1))
    crit.bank.a_bar.copy_(F.normalize(z + 0.5 * torch.randn(N, d, generator=g), dim=1))
    crit.bank.s.copy_((crit.bank.v_bar * crit.bank.a_bar).sum(1))


def batch(B=6, d=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(B, d, generator=g), dim=1).requires_grad_()
    a = F.normalize(torch.randn(B, d, generator=g), dim=1).requires_grad_()
    return v, a


N, D, K = 40, 16, 12
INDEX = torch.tensor([3, 7, 11, 20, 25, 39])
NEGATIVES = torch.tensor([0, 7, 5, 9, 25, 14, 30, 31, 2, 17, 33, 36])  # 7, 25: batch rows, masked


# ----------------------------------------------------------------------------------------------
# Parity with the loops
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tau_s", [0.07, 0.5])
def test_softening_scores_match_loop(strategy, tau_s):
    """S_v(j|i), S_a(j|i) of each strategy (METHOD.md, Soft-xID) equal the loop,
    masked own slot included."""
    crit = RobustXIDLoss(N, D, num_negatives=K)
    structured_bank(crit)
    vb, ab = crit.bank.v_bar, crit.bank.a_bar
    mask = NEGATIVES[None, :] == INDEX[:, None]
    S_v, S_a = softening_scores(strategy, vb[INDEX], ab[INDEX], vb[NEGATIVES], ab[NEGATIVES],
                                tau_s, mask)
    for b, i in enumerate(INDEX.tolist()):
        keep = [0] + [1 + k for k, n in enumerate(NEGATIVES.tolist()) if n != i]
        C = [i] + [n for n in NEGATIVES.tolist() if n != i]
        ref_v, ref_a = ref_softening(strategy, i, C, vb.double(), ab.double(), tau_s)
        for name, S, ref in (("S_v(j|i), video querying", S_v, ref_v), ("S_a(j|i), audio querying", S_a, ref_a)):
            expect_close(S[b, keep], ref, f"{name}, {strategy} strategy, τ_s = {tau_s}, row {b} "
                         f"(instance {i}) over its {len(keep)} candidates", rtol=1e-4, atol=1e-6)
            dropped = [c for c in range(1 + K) if c not in keep]
            assert (S[b, dropped] == 0).all(), (
                f"{name}, row {b}: column {dropped} is the row's own instance drawn as a negative, "
                f"no candidate, so S must be 0 there; yours {show(S[b, dropped])}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_and_gradient_match_loop(mode, strategy):
    """L_xID / L_Weighted / L_Soft / L_Robust and their gradients w.r.t. v, a equal the loop."""
    crit = RobustXIDLoss(N, D, mode=mode, num_negatives=K, strategy=strategy, lam=0.4, tau_s=0.2)
    structured_bank(crit)
    v, a = batch()
    loss, _ = crit(v, a, INDEX, negatives=NEGATIVES)
    loss.backward()
    v2, a2 = (t.detach().clone().requires_grad_() for t in (v, a))
    ref = ref_loss(crit, v2, a2, INDEX, NEGATIVES)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.grad.double(), v2.grad.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), a2.grad.double(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Special cases that reduce to xID
# ----------------------------------------------------------------------------------------------
def loss_of(seed=0, **kw):
    crit = RobustXIDLoss(N, D, num_negatives=K, **kw)
    structured_bank(crit, seed)
    v, a = batch()
    return crit(v, a, INDEX, negatives=NEGATIVES)


def test_lambda_zero_is_xid():
    """T(j|i) = (1-λ)·1[j=i] + λ·S(j|i): at λ = 0 Soft-xID is exactly xID."""
    assert torch.equal(loss_of(mode="soft", lam=0.0)[0], loss_of(mode="xid")[0])


def test_w_min_one_is_xid():
    """W(s) = w_min + (1-w_min)·sigmoid(·): at w_min = 1 every weight is 1, Weighted-xID is xID."""
    loss, diag = loss_of(mode="weighted", w_min=1.0)
    assert torch.equal(diag["weights"], torch.ones(len(INDEX)))
    torch.testing.assert_close(loss, loss_of(mode="xid")[0])


def test_equal_weights_is_xid():
    """Σ w_i L_i / Σ w_i with every w_i equal is the plain mean: all scores equal -> xID.
    Also checks the σ = 0 guard (every s_i identical)."""
    crit = RobustXIDLoss(N, D, mode="weighted", num_negatives=K)
    crit.bank.s.fill_(0.5)
    v, a = batch()
    loss, diag = crit(v, a, INDEX, negatives=NEGATIVES)
    w = diag["weights"]
    assert torch.isfinite(w).all() and torch.allclose(w, w[0].expand_as(w))
    crit.mode = "xid"
    torch.testing.assert_close(loss, crit(v, a, INDEX, negatives=NEGATIVES)[0])


def test_warmup_is_xid():
    """During warm-up every mode is plain xID (the banks are not yet meaningful)."""
    crit = RobustXIDLoss(N, D, mode="robust", num_negatives=K)
    structured_bank(crit)
    v, a = batch()
    warm, diag = crit(v, a, INDEX, warmup=True, negatives=NEGATIVES)
    crit.mode = "xid"
    assert torch.equal(warm, crit(v, a, INDEX, negatives=NEGATIVES)[0])
    assert float(diag["target_on_positive"]) == 1.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lambda_one_is_pure_S(strategy):
    """At λ = 1 the targets are the softening scores alone: T = S."""
    crit = RobustXIDLoss(N, D, mode="soft", lam=1.0, num_negatives=K, strategy=strategy)
    structured_bank(crit)
    vb, ab = crit.bank.v_bar, crit.bank.a_bar
    mask = NEGATIVES[None, :] == INDEX[:, None]
    S_v, S_a = softening_scores(strategy, vb[INDEX], ab[INDEX], vb[NEGATIVES], ab[NEGATIVES],
                                crit.tau_s, mask)
    v, a = batch()
    _, diag = crit(v, a, INDEX, negatives=NEGATIVES)
    torch.testing.assert_close(diag["targets_v"], S_v)
    torch.testing.assert_close(diag["targets_a"], S_a)


# ----------------------------------------------------------------------------------------------
# W(s): the faulty-positive weight
# ----------------------------------------------------------------------------------------------
def test_weight_function_shape():
    """W(μ + δσ) = (1 + w_min)/2; W is monotone, inside [w_min, 1], and sharper as κ shrinks."""
    mu, sigma, delta, kappa, w_min = torch.tensor(0.3), torch.tensor(0.1), -2.0, 0.5, 0.25
    given = "μ = 0.3, σ = 0.1, δ = -2, κ = 0.5, w_min = 0.25"
    mid = mu + delta * sigma
    for d, wm in [(-2.0, 0.25), (-1.0, 0.25), (0.0, 0.1), (1.0, 0.5)]:
        expect_close(faulty_positive_weights(mu + d * sigma, mu, sigma, d, kappa, wm), (1 + wm) / 2,
                     f"W(s) at its mid-point s = μ + δσ = {float(mu + d * sigma):.1f} (μ = 0.3, σ = 0.1, "
                     f"δ = {d:g}, w_min = {wm}) should be (1 + w_min)/2")
    s = torch.linspace(-1, 1, 2001)
    w = faulty_positive_weights(s, mu, sigma, delta, kappa, w_min)
    assert isinstance(w, torch.Tensor) and w.shape == s.shape, (
        f"W(s) of 2001 scores must be one weight per score, shaped like s: yours {getattr(w, 'shape', w)}")
    k = int(w.diff().argmin())
    assert w.diff()[k] >= 0, (f"W(s) must grow with s (audio that matches its video is less likely "
                              f"a faulty positive): yours gives W({s[k]:.3f}) = {w[k]:.4f} > "
                              f"W({s[k + 1]:.3f}) = {w[k + 1]:.4f} ({given})")
    assert w.min() >= w_min - 1e-6 and w.max() <= 1 + 1e-6, (
        f"W(s) must stay within [w_min, 1] = [0.25, 1]: yours spans [{w.min():.4f}, {w.max():.4f}]")
    assert w[0] < w_min + 1e-3, (f"far below the mid-point (s = -1, 11σ below it) W(s) should be "
                                 f"w_min = 0.25 to 3 decimals: yours {w[0]:.4f}")
    assert w[-1] > 1 - 1e-3, f"far above the mid-point (s = 1) W(s) should be 1 to 3 decimals: yours {w[-1]:.4f}"
    expect_close(faulty_positive_weights(mid + kappa * sigma, mu, sigma, delta, kappa, w_min),
                 w_min + (1 - w_min) / (1 + math.exp(-1)),
                 f"W(s) one κσ above the mid-point, at s = 0.15 ({given})")
    above, below = mid + 0.5 * sigma, mid - 0.5 * sigma
    for k_sharp, k_soft in [(0.1, 0.5), (0.5, 2.0)]:
        sharp = faulty_positive_weights(torch.stack([below, above]), mu, sigma, delta, k_sharp, w_min)
        soft = faulty_positive_weights(torch.stack([below, above]), mu, sigma, delta, k_soft, w_min)
        assert sharp[1] > soft[1] and sharp[0] < soft[0], (
            f"a smaller κ must make the step sharper: half a σ above the mid-point W should be higher "
            f"with κ = {k_sharp} than with κ = {k_soft}, half a σ below lower; yours "
            f"{sharp[1]:.4f} vs {soft[1]:.4f} above, {sharp[0]:.4f} vs {soft[0]:.4f} below")


def test_weights_come_from_bank_scores():
    """w_i = W(s_i) with s_i = v̄_i·ā_i and μ, σ over all N slots."""
    crit = RobustXIDLoss(N, D, mode="weighted", num_negatives=K)
    structured_bank(crit)
    v, a = batch()
    _, diag = crit(v, a, INDEX, negatives=NEGATIVES)
    s = (crit.bank.v_bar * crit.bank.a_bar).sum(1)
    expected = faulty_positive_weights(s[INDEX], s.mean(), s.std())
    torch.testing.assert_close(diag["weights"], expected)


# ----------------------------------------------------------------------------------------------
# Targets, gradients, banks
# ----------------------------------------------------------------------------------------------
def test_soft_targets_mix_the_one_hot_and_S():
    """T(j|i) = (1 - λ)·1[j = i] + λ·S(j|i), the positive in column 0: one row worked by hand."""
    S = torch.tensor([[0.5, 0.3, 0.2]])
    row = "S(·|i) = (0.5, 0.3, 0.2) over the candidates (i, j_1, j_2)"
    T = soft_targets(S, 0.4)
    assert torch.equal(S, torch.tensor([[0.5, 0.3, 0.2]])), (
        f"soft_targets must leave S as it was (the loss reads the scores again): yours changed it to {show(S)}")
    expect_close(T, [[0.6 + 0.2, 0.12, 0.08]], f"T(·|i) for {row} and λ = 0.4")
    expect_close(soft_targets(S, 0.0), [[1.0, 0.0, 0.0]], f"T(·|i) for {row} and λ = 0: xID's one-hot")
    expect_close(soft_targets(S, 1.0), [[0.5, 0.3, 0.2]], f"T(·|i) for {row} and λ = 1: S itself")
    two = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    expect_close(soft_targets(two, 0.4), [[0.8, 0.12, 0.08], [0.64, 0.04, 0.32]],
                 "T for two rows at λ = 0.4, each row's positive in column 0")


def test_soft_cross_entropy_by_hand():
    """-Σ_j T(j|i) log P(j|i) with P = softmax of the row; a masked candidate (the row's own
    instance drawn as a negative) has P = 0 and T = 0, and costs nothing."""
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0]])                   # P = (1/2, 1/4, 1/4)
    T = torch.tensor([[0.5, 0.5, 0.0]])
    expected = -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    expect_close(soft_cross_entropy(logits, T), [expected],
                 "the loss of a row with logits (ln 2, 0, 0), so P(·|i) = (1/2, 1/4, 1/4), and "
                 "T(·|i) = (1/2, 1/2, 0); one value per row")
    mask = torch.tensor([[False, True]])                                 # the last candidate is out
    expected_masked = -(0.5 * math.log(2 / 3) + 0.5 * math.log(1 / 3))   # P = (2/3, 1/3, 0)
    expect_close(soft_cross_entropy(logits, T, mask), [expected_masked],
                 "the same row with its last negative masked (the row's own instance drawn as a "
                 "negative is no candidate, so P(·|i) = (2/3, 1/3, 0))")
    T_on_masked = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    two = torch.cat([logits, torch.tensor([[0.0, 5.0, -80.0]])])
    out = soft_cross_entropy(two, T_on_masked, torch.tensor([[False, True], [False, True]]))
    assert torch.isfinite(out).all(), (
        "a masked candidate has P = 0 and log P = -inf; with T = 0 there it must cost 0, not "
        f"0·(-inf) = nan: yours gives {show(out)} for two rows with their last negative masked")


def test_class_oracle_spreads_lambda_over_the_own_class():
    """The soft targets' oracle: S(j|i) = 1/n over the n candidates of i's class (the positive
    included, the row's own instance drawn as a negative left out), so T(j|i) = (1 - λ)·1[j = i]
    + λ/n on each of them; by a loop over INDEX and NEGATIVES."""
    labels = torch.arange(N) % 4                                          # 4 classes
    mask = NEGATIVES[None, :] == INDEX[:, None]
    S = class_oracle_scores(labels, INDEX, NEGATIVES, mask)
    for b, i in enumerate(INDEX.tolist()):
        same = [k + 1 for k, n in enumerate(NEGATIVES.tolist())
                if labels[n] == labels[i] and n != i]
        expected = torch.zeros(1 + K)
        expected[[0] + same] = 1.0 / (1 + len(same))
        torch.testing.assert_close(S[b], expected, msg=f"instance {i}, class {int(labels[i])}")
    crit = RobustXIDLoss(N, D, mode="soft", lam=0.5, num_negatives=K)
    crit.set_class_oracle(labels)
    structured_bank(crit)
    v, a = batch()
    loss, diag = crit(v, a, INDEX, negatives=NEGATIVES)
    T = soft_targets(S, 0.5)
    torch.testing.assert_close(diag["targets_v"], T)
    torch.testing.assert_close(diag["targets_a"], T)
    logits_v = torch.cat([(v * crit.bank.a_bar[INDEX]).sum(1, keepdim=True),
                          v @ crit.bank.a_bar[NEGATIVES].t()], 1) / crit.tau
    logits_a = torch.cat([(a * crit.bank.v_bar[INDEX]).sum(1, keepdim=True),
                          a @ crit.bank.v_bar[NEGATIVES].t()], 1) / crit.tau
    expected = (soft_cross_entropy(logits_v, T, mask)
                + soft_cross_entropy(logits_a, T, mask)).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_targets_are_distributions(strategy, lam):
    """S(j|i) and T(j|i) are non-negative and each row sums to 1."""
    crit = RobustXIDLoss(N, D, mode="robust", lam=lam, num_negatives=K, strategy=strategy)
    structured_bank(crit)
    v, a = batch()
    _, diag = crit(v, a, INDEX, negatives=NEGATIVES)
    for T in (diag["targets_v"], diag["targets_a"]):
        assert (T >= 0).all()
        torch.testing.assert_close(T.sum(1), torch.ones(len(INDEX)))


def test_gradients_reach_embeddings_not_banks_or_weights():
    """The loss trains v and a; banks, weights and targets are constants (no gradient)."""
    crit = RobustXIDLoss(N, D, mode="robust", num_negatives=K)
    structured_bank(crit)
    v, a = batch()
    loss, diag = crit(v, a, INDEX, negatives=NEGATIVES)
    loss.backward()
    assert v.grad.abs().sum() > 0 and a.grad.abs().sum() > 0
    assert list(crit.parameters()) == []
    for t in (crit.bank.v_bar, crit.bank.a_bar, crit.bank.s):
        assert not t.requires_grad and t.grad is None
    for t in (diag["weights"], diag["targets_v"], diag["targets_a"]):
        assert not t.requires_grad


def test_bank_update_momentum_unit_norm_only_batch_slots():
    """v̄_i <- normalize(m·v̄_i + (1-m)·v_i), same for ā, with the m given (train.py fills the bank
    with m = 0, whatever the bank's momentum); s_i follows; other slots unchanged. Worked by hand:
    v̄_i = e_0 moved towards v_i = e_1, ā_i = e_1 towards a_i = e_0."""
    e0, e1 = torch.eye(D)[0], torch.eye(D)[1]
    by_hand = {0.0: (0.0, 1.0), 0.3: (0.3939193, 0.9191450), 0.5: (0.7071068, 0.7071068),
               0.9: (0.9938837, 0.1104315)}                      # normalize(m, 1 - m), by hand
    for m, (x, y) in by_hand.items():
        bank = MemoryBank(N, D, momentum=0.5, seed=3)
        bank.v_bar[INDEX], bank.a_bar[INDEX] = e0, e1
        bank.s.copy_((bank.v_bar * bank.a_bar).sum(1))
        before_v, before_a, before_s = bank.v_bar.clone(), bank.a_bar.clone(), bank.s.clone()
        v, a = e1.repeat(len(INDEX), 1), e0.repeat(len(INDEX), 1)
        if m == 0.5:
            bank.update(INDEX, v, a)                             # the bank's own momentum, 0.5
        else:
            bank.move_slots(INDEX, v, a, m)
        for name, bar, expected in (("v̄", bank.v_bar, x * e0 + y * e1), ("ā", bank.a_bar, y * e0 + x * e1)):
            expect_close(bar.norm(dim=1), torch.ones(N), f"the lengths of all {N} {name} slots: unit vectors")
            expect_close(bar[INDEX[0]][:2], expected[:2],
                         f"{name}_3's first two entries after moving {'e_0 towards e_1' if name == 'v̄' else 'e_1 towards e_0'} "
                         f"with m = {m}")
            expect_close(bar[INDEX], expected.repeat(len(INDEX), 1),
                         f"{name} at the batch's {len(INDEX)} slots after the update with m = {m}")
        others = torch.ones(N, dtype=torch.bool)
        others[INDEX] = False
        assert (torch.equal(bank.v_bar[others], before_v[others])
                and torch.equal(bank.a_bar[others], before_a[others])), (
            f"only the batch's slots {INDEX.tolist()} may move; yours changed "
            f"{sorted(set((bank.v_bar != before_v).any(1).nonzero().flatten().tolist()) - set(INDEX.tolist()))}")
        expect_close(bank.s[INDEX], torch.full((len(INDEX),), 2 * x * y),
                     f"the scores s_i = v̄_i·ā_i of the moved slots (m = {m}; W(s) reads them)")
        assert torch.equal(bank.s[others], before_s[others]), "the scores of slots that did not move must not change"


def test_bank_rejects_out_of_range_index():
    """An index outside [0, N) is a bug upstream: an error, never a silent wrap-around."""
    bank = MemoryBank(N, D)
    v, a = batch(B=2, d=D)
    for bad in ([0, N], [-1, 0]):
        try:
            bank.update(torch.tensor(bad), v, a)
        except IndexError as err:
            assert "out of range" in str(err), f"the IndexError should say the index is out of range: {err}"
        else:
            pytest.fail(f"the bank update of slots {bad} must raise IndexError (self.check_index): the "
                        f"bank has {N} slots, and a wrong index is a bug upstream, never wrapped around")
    crit = RobustXIDLoss(N, D, num_negatives=K)
    with pytest.raises(IndexError, match="40 slots"):
        crit(v, a, torch.tensor([1, N]))


def test_negatives_are_distinct_and_reproducible_from_state():
    """K distinct slots per draw; the generator is in state_dict: a restored loss draws the same."""
    g = torch.Generator().manual_seed(0)
    neg = sample_negatives(N, K, g)
    assert len(set(neg.tolist())) == K and neg.min() >= 0 and neg.max() < N
    a = RobustXIDLoss(N, D, num_negatives=K, seed=5)
    v_emb, a_emb = batch()
    a(v_emb, a_emb, INDEX)
    b = RobustXIDLoss(N, D, num_negatives=K, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.bank.v_bar, b.bank.v_bar)
    _, da = a(v_emb, a_emb, INDEX)
    _, db = b(v_emb, a_emb, INDEX)
    assert torch.equal(da["negatives"], db["negatives"])


@pytest.mark.parametrize("kwargs, flag", [
    ({"mode": "robustx"}, "mode"), ({"strategy": "cycles"}, "strategy"), ({"lam": 1.5}, "lam"),
    ({"kappa": 0.0}, "kappa"), ({"tau": 0.0}, "tau"), ({"w_min": -0.1}, "w_min"),
    ({"num_negatives": N}, "K"), ({"bank_momentum": 1.0}, "momentum")])
def test_invalid_hyperparameters_are_named(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        RobustXIDLoss(N, D, **{"num_negatives": K, **kwargs})


# ----------------------------------------------------------------------------------------------
# The mechanism, and numerical stability
# ----------------------------------------------------------------------------------------------
def roc_auc(score, positive):
    """P(score of a random positive > score of a random negative), ties counted half."""
    p, n = score[positive], score[~positive]
    return float((p[:, None] > n[None, :]).float().mean()
                 + 0.5 * (p[:, None] == n[None, :]).float().mean())


def test_weights_find_mismatched_pairs():
    """Weighted-xID's premise: after the banks have averaged many noisy views, s_i = v̄_i·ā_i is low
    for pairs whose audio belongs to another instance, so W(s_i) separates them (AUC > 0.9)."""
    n, d = 300, 32
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g)                      # what instance i shows and sounds like
    faulty = torch.zeros(n, dtype=torch.bool)
    faulty[torch.randperm(n, generator=g)[: int(0.3 * n)]] = True
    audio_source = torch.arange(n)
    fi = faulty.nonzero().squeeze(1)
    audio_source[fi] = fi.roll(1)                           # 30% get another instance's audio
    bank = MemoryBank(n, d, momentum=0.5, seed=1)
    for _ in range(10):                                     # ten "epochs" of noisy views
        for idx in torch.randperm(n, generator=g).split(32):
            v = F.normalize(z[idx] + 1.5 * torch.randn(len(idx), d, generator=g), dim=1)
            a = F.normalize(z[audio_source[idx]] + 1.5 * torch.randn(len(idx), d, generator=g),
                            dim=1)
            bank.update(idx, v, a)
    mu, sigma = bank.score_stats()
    w = faulty_positive_weights(bank.s, mu, sigma)
    assert roc_auc(-w, faulty) > 0.9


def test_stable_at_small_temperature():
    """τ = 0.01 puts logits near ±100: softmax and log are still finite, gradients too."""
    crit = RobustXIDLoss(N, D, mode="robust", tau=0.01, tau_s=0.01, num_negatives=K)
    structured_bank(crit)
    v = crit.bank.a_bar[INDEX].clone().requires_grad_()      # perfectly aligned: the largest logits
    a = crit.bank.v_bar[INDEX].clone().requires_grad_()
    loss, diag = crit(v, a, INDEX, negatives=NEGATIVES)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v.grad).all() and torch.isfinite(a.grad).all()
    assert torch.isfinite(diag["targets_v"]).all() and torch.isfinite(diag["targets_a"]).all()


def test_stable_under_autocast():
    """Called inside bf16 autocast with bf16 embeddings, the loss is computed in float32: finite,
    float32, and within bf16's rounding of the float32 result."""
    crit = RobustXIDLoss(N, D, mode="robust", num_negatives=K)
    structured_bank(crit)
    v, a = batch()
    full, _ = crit(v, a, INDEX, negatives=NEGATIVES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _ = crit(v.bfloat16(), a.bfloat16(), INDEX, negatives=NEGATIVES)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-2)
