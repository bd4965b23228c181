"""Robust-xID losses: xID, Weighted-xID, Soft-xID and Robust-xID.

Morgado, Misra, Vasconcelos. Robust Audio-Visual Instance Discrimination. CVPR 2021.
Read beside the paper; symbols follow METHOD.md:

    v_i, a_i     L2-normalised video / audio embeddings of instance i       (B, d)
    v̄, ā         memory banks, one slot per training instance               (N, d)
    C_i          candidates of i: i itself (column 0) + K shared negatives  (1+K,)
    P(ā_j|v_i)   softmax_j(v_i·ā_j / τ) over C_i
    s_i          alignment score v̄_i·ā_i;  μ, σ  its mean and std over all N slots
    W(s)         faulty-positive weight  (Weighted-xID)
    S(j|i)       softening scores; T(j|i) = (1-λ)·1[j=i] + λ·S(j|i)  (Soft-xID)

The values a run uses are train.py's flags (METHOD.md, "Defaults").

Everything the losses compute in the bank's space is done in float32 with autocast off, so the
module is safe to call from inside a bf16/fp16 autocast region.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MODES = ("xid", "weighted", "soft", "robust")
STRATEGIES = ("bootstrap", "swapped", "neighbor", "cycle")


# ----------------------------------------------------------------------------------------------
# Memory banks v̄, ā
# ----------------------------------------------------------------------------------------------
class MemoryBank(nn.Module):
    """Two banks v̄, ā with one slot per training instance, and the scores s_i = v̄_i·ā_i.

    Slots start as random unit vectors (train.py fills them with the initial encoders' embeddings
    before the first step, unless --bank-init random). After each step the batch's slots move
    towards the new embeddings: v̄_i <- normalize(m·v̄_i + (1-m)·v_i), likewise ā_i. The banks are
    buffers, never parameters, so no gradient reaches them; `state_dict()` saves them.
    s is kept up to date slot by slot, so μ and σ over all N slots cost one pass over N floats,
    not over the (N, d) banks.
    """

    def __init__(self, num_instances, dim=128, momentum=0.5, seed=0):
        super().__init__()
        if num_instances < 2:
            raise ValueError(f"a memory bank needs at least 2 instances, got {num_instances}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"bank momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        g = torch.Generator().manual_seed(seed)
        v_bar = F.normalize(torch.randn(num_instances, dim, generator=g), dim=1)  # (N, d)
        a_bar = F.normalize(torch.randn(num_instances, dim, generator=g), dim=1)  # (N, d)
        self.register_buffer("v_bar", v_bar)
        self.register_buffer("a_bar", a_bar)
        self.register_buffer("s", (self.v_bar * self.a_bar).sum(1))  # (N,)

    @property
    def num_instances(self):
        return self.v_bar.shape[0]

    def check_index(self, index):
        """Out-of-range indices are a bug upstream (a wrong dataset size), never wrapped around."""
        if index.numel() and (index.min() < 0 or index.max() >= self.num_instances):
            raise IndexError(f"bank index out of range: got [{int(index.min())}, "
                             f"{int(index.max())}], "
                             f"the bank has {self.num_instances} slots (one per training instance)")

    def score_stats(self):
        """μ, σ of the alignment scores s_i over all N slots (sample std, as in the supplement).
        σ is floored at 1e-6 so that W(s) stays defined when every score is equal."""
        return self.s.mean(), self.s.std().clamp_min(1e-6)

    @torch.no_grad()
    def update(self, index, v, a, momentum=None):
        """After a step. Under torch.distributed every rank's embeddings and indices are gathered
        first, so all ranks move the same slots the same way and hold identical banks."""
        index, v, a = index.to(self.v_bar.device), v.detach().float(), a.detach().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            index, v, a = (gather_from_all_ranks(t) for t in (index, v, a))
        self.move_slots(index, v, a, self.momentum if momentum is None else momentum)

    def move_slots(self, index, v, a, m):
        """v̄_i <- normalize(m·v̄_i + (1-m)·v_i) and ā_i likewise for the slots in index; s_i follows.
        m = 0 writes v, a as they are (train.py fills the bank so before the first step)."""
        self.check_index(index)
        self.v_bar[index] = F.normalize(m * self.v_bar[index] + (1 - m) * v, dim=1)
        self.a_bar[index] = F.normalize(m * self.a_bar[index] + (1 - m) * a, dim=1)
        self.s[index] = (self.v_bar[index] * self.a_bar[index]).sum(1)


def gather_from_all_ranks(t):
    """Concatenate a tensor from every rank along dim 0. Batches may differ in size (a rank whose
    clip failed to decode has one row fewer), so sizes are exchanged first and rows padded."""
    world = dist.get_world_size()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])


def mean_over_ranks(t):
    """The mean of a scalar tensor over the processes of a torch.distributed run (t itself when
    there is one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t


def check_strategy(strategy):
    if strategy not in STRATEGIES:
        raise ValueError(f"softening strategy must be one of {STRATEGIES}, got {strategy!r}")


def check_num_negatives(K, num_instances):
    """K must leave room for the positive: 1 <= K <= N - 1."""
    if not 0 < K < num_instances:
        raise ValueError(f"K (number of negatives) must be in [1, N-1] = [1, {num_instances - 1}], "
                         f"got {K}")


def sample_negatives(num_instances, K, generator):
    """K distinct slots drawn uniformly, shared by the whole batch (one shared set: METHOD.md).
    Drawn on the CPU from a seeded generator: every rank of a multi-GPU run draws the same set."""
    check_num_negatives(K, num_instances)
    return torch.randperm(num_instances, generator=generator)[:K]


# ----------------------------------------------------------------------------------------------
# The equations, one function each
# ----------------------------------------------------------------------------------------------
def candidate_logits(x, y_pos, y_neg):
    """x_i·y_j for every candidate j of C_i: column 0 the positive y_i, then the K shared negatives.
    x, y_pos: (B, d), y_neg: (K, d) -> (B, 1+K). Never forms a (B, K, d) tensor."""
    pos = (x * y_pos).sum(1, keepdim=True)  # (B, 1)
    neg = x @ y_neg.t()                     # (B, K)
    return torch.cat([pos, neg], dim=1)     # (B, 1+K)


def faulty_positive_weights(s, mu, sigma, delta=-2.0, kappa=0.5, w_min=0.25):
    """W(s) = w_min + (1 - w_min) · sigmoid((s - (μ + δσ)) / (κσ))   (our reading of its form).

    Mid-point μ + δσ, where W = (1 + w_min)/2; κ sets how sharp the step is; W lies in [w_min, 1].
    Low alignment s (audio unlike its own video) -> likely faulty positive -> low weight."""
    return w_min + (1 - w_min) * torch.sigmoid((s - (mu + delta * sigma)) / (kappa * sigma))


def _masked_log_softmax(logits, mask):
    """log softmax over the candidates (B, 1+K). mask (B, K) marks negatives that are the row's own
    instance: they are not candidates, their probability is exactly 0."""
    if mask is not None:
        logits = logits.masked_fill(F.pad(mask, (1, 0)), float("-inf"))
    return logits.log_softmax(dim=1)


def _cycle_scores(x_pos, y_pos, x_neg, y_neg, lse_neg, tau_s, mask):
    """S_x(j|i) ∝ P(y_j | x_i) · P(x_i | y_j): j is a target when the cycle x_i -> y_j -> x_i
    closes.

    Both factors are over the candidates C_i: P(y_j | x_i) over the y's, P(x_i | y_j) over the x's
    {x_k : k ∈ C_i} = {x_i} ∪ negatives. lse_neg[n] = log Σ_{m ∈ negatives} exp(y_n·x_m / τ_s),
    (K,), is the negatives' part of that normaliser for a negative y_n; the same for every row."""
    xy = candidate_logits(x_pos, y_pos, y_neg) / tau_s          # x_i·y_j/τ_s        (B, 1+K)
    log_forward = _masked_log_softmax(xy, mask)                  # log P(y_j | x_i)   (B, 1+K)

    # j = i, the positive: x_i·y_i against y_i·x_k for the candidate x's
    yx = candidate_logits(y_pos, x_pos, x_neg) / tau_s          # y_i·x_k/τ_s        (B, 1+K)
    log_back_pos = _masked_log_softmax(yx, mask)[:, :1]          # log P(x_i | y_i)   (B, 1)

    # j = n, a negative: log P(x_i | y_n) = y_n·x_i/τ_s - log Σ_{k∈C_i} exp(y_n·x_k/τ_s), where
    # the sum is the negatives' part (lse_neg) plus x_i's own term -- unless x_i is itself one of
    # the negatives (then lse_neg counts it already, and its own term is exp(-inf) = 0)
    own_term = xy[:, 1:]                                         # y_n·x_i/τ_s        (B, K)
    if mask is not None:
        own_term = own_term.masked_fill(mask.any(1, keepdim=True), float("-inf"))
    log_z = torch.logaddexp(lse_neg[None, :], own_term)          # (B, K)
    log_back_neg = xy[:, 1:] - log_z                             # log P(x_i | y_n)   (B, K)

    log_back = torch.cat([log_back_pos, log_back_neg], dim=1)    # log P(x_i | y_j)   (B, 1+K)
    return _masked_log_softmax(log_forward + log_back, mask).exp()  # renormalised over j


@torch.no_grad()
def softening_scores(strategy, v_pos, a_pos, v_neg, a_neg, tau_s=0.07, mask=None):
    """Softening scores S_v(j|i), S_a(j|i) over the candidates, from the memory banks (our reading).

    v_pos, a_pos: the batch's own bank rows v̄_i, ā_i (B, d); v_neg, a_neg: the K shared negatives'
    rows (K, d). mask (B, K), optional: True where a negative is the row's own instance (no mass).
    Returns (S_v, S_a), each (B, 1+K), rows summing to 1, column 0 the positive. S_a swaps v and a.
    """
    def softmax_j(query, own, others):
        """softmax_j(query_i · key_j / τ_s) over the candidates: key_i = own, then the negatives."""
        return _masked_log_softmax(candidate_logits(query, own, others) / tau_s, mask).exp()

    if strategy == "bootstrap":    # the model's own cross-modal prediction
        S_v = softmax_j(v_pos, a_pos, a_neg)                            # softmax_j(v̄_i·ā_j / τ_s)
        S_a = softmax_j(a_pos, v_pos, v_neg)                            # softmax_j(ā_i·v̄_j / τ_s)
    elif strategy == "swapped":    # the other modality's prediction
        S_v = softmax_j(a_pos, v_pos, v_neg)                            # softmax_j(ā_i·v̄_j / τ_s)
        S_a = softmax_j(v_pos, a_pos, a_neg)                            # softmax_j(v̄_i·ā_j / τ_s)
    elif strategy == "neighbor":   # within-modal similarity
        S_v = softmax_j(v_pos, v_pos, v_neg)                            # softmax_j(v̄_i·v̄_j / τ_s)
        S_a = softmax_j(a_pos, a_pos, a_neg)                            # softmax_j(ā_i·ā_j / τ_s)
    elif strategy == "cycle":      # the cycle v_i -> a_j -> v_i closes
        av = a_neg @ v_neg.t() / tau_s                    # av[n, m] = ā_n·v̄_m / τ_s  (K, K)
        # back from a negative audio ā_n, normalised over the negatives' videos v̄_m: sum over
        # m (dim 1); back from a negative video v̄_m, over the negatives' audio ā_n: over n (dim 0)
        # S_v ∝ P(ā_j|v̄_i)·P(v̄_i|ā_j), S_a ∝ P(v̄_j|ā_i)·P(ā_i|v̄_j)
        S_v = _cycle_scores(v_pos, a_pos, v_neg, a_neg, av.logsumexp(1), tau_s, mask)
        S_a = _cycle_scores(a_pos, v_pos, a_neg, v_neg, av.logsumexp(0), tau_s, mask)
    else:
        check_strategy(strategy)
    return S_v, S_a


def class_oracle_scores(labels, index, negatives, mask=None):
    """S(j|i) from the ground truth: spread evenly over the candidates of i's own class, the
    positive included (masked negatives excepted). Not a method anyone could train with: T(j|i)
    built from it is what perfect softening of the faulty negatives would give, the bound the
    cycle's S(j|i) is measured against. labels (N,) class of every slot -> (B, 1+K)."""
    same = labels[negatives][None, :] == labels[index][:, None]          # (B, K)
    if mask is not None:
        same = same & ~mask
    S = torch.cat([torch.ones_like(same[:, :1]), same], dim=1).float()   # (B, 1+K)
    return S / S.sum(1, keepdim=True)


def one_hot_targets(like):
    """T(j|i) = 1[j = i]: all the mass on the positive, column 0 (xID's targets). like: (B, 1+K)."""
    one_hot = torch.zeros_like(like)
    one_hot[:, 0] = 1.0
    return one_hot


def soft_targets(S, lam):
    """T(j|i) = (1 - λ)·1[j = i] + λ·S(j|i); the positive is column 0. λ = 0 gives xID's one-hot."""
    return (1 - lam) * one_hot_targets(S) + lam * S


def soft_cross_entropy(logits, targets, mask=None):
    """-Σ_j T(j|i) log P(j|i) per row (B,). Masked negatives have T = 0 and are left out."""
    log_p = _masked_log_softmax(logits, mask)
    if mask is not None:
        log_p = log_p.masked_fill(F.pad(mask, (1, 0)), 0.0)  # 0 · (-inf) would be NaN
    return -(targets * log_p).sum(1)


# ----------------------------------------------------------------------------------------------
# The loss: xID, Weighted-xID, Soft-xID, Robust-xID
# ----------------------------------------------------------------------------------------------
class RobustXIDLoss(nn.Module):
    """L = Σ_i w_i L_Soft(i) / Σ_i w_i, with
        L_Soft(i) = -Σ_j T_v(j|i) log P(ā_j | v_i) - Σ_j T_a(j|i) log P(v̄_j | a_i).

    mode      w_i            T
    xid       1              one-hot               L_xID(i) = -log P(ā_i|v_i) - log P(v̄_i|a_i)
    weighted  W(s_i)         one-hot               faulty positives down-weighted
    soft      1              (1-λ)·1 + λ·S         faulty negatives softened
    robust    W(s_i)         (1-λ)·1 + λ·S         both

    During warm-up (banks still near random, so neither W nor S means anything) every mode is xID.
    Owns the memory banks and the seeded generator of negatives; its state_dict holds both.
    """

    def __init__(self, num_instances, dim=128, mode="robust", num_negatives=1024, tau=0.07,
                 bank_momentum=0.5, delta=-2.0, kappa=0.5, w_min=0.25, lam=0.5, strategy="cycle",
                 tau_s=0.07, seed=0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_strategy(strategy)  # here, not at the first soft step after the warm-up
        for name, value, ok, rule in [("tau", tau, tau > 0, "> 0"),
                                      ("tau_s", tau_s, tau_s > 0, "> 0"),
                                      ("kappa", kappa, kappa > 0, "> 0"),
                                      ("lam", lam, 0 <= lam <= 1, "in [0, 1]"),
                                      ("w_min", w_min, 0 <= w_min <= 1, "in [0, 1]")]:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {value}")
        check_num_negatives(num_negatives, num_instances)
        self.bank = MemoryBank(num_instances, dim, bank_momentum, seed)
        self.mode, self.K, self.tau, self.tau_s = mode, num_negatives, tau, tau_s
        self.delta, self.kappa, self.w_min = delta, kappa, w_min
        self.lam, self.strategy = lam, strategy
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.oracle = None  # (faulty (N,) bool, weight): the ground truth's weights (set_oracle)
        self.class_labels = None  # (N,) classes: the ground truth's soft targets (set_class_oracle)

    def set_oracle(self, faulty, weight):
        """Weighted-xID with the ground truth in place of W(s): w_i = weight (w_min, or 0) for the
        pairs known to be faulty (train.py passes the injected ones), 1 for all others. Not a method
        anyone could train with: what a perfect detector of the *injected* pairs would reach with
        this weighting (one that also down-weighted the natural faulty pairs could do better), which
        tells a gap in detection from a gap in weighting. A run sets it again at every start (it
        follows from the injection's seed), so it is not part of the state_dict."""
        faulty = torch.as_tensor(faulty, dtype=torch.bool, device=self.bank.s.device)
        self.oracle = (faulty, float(weight))

    def set_class_oracle(self, labels):
        """Soft-xID with the ground truth in place of S(j|i): class_oracle_scores from the slots'
        classes. It measures what softening faulty negatives can win on a dataset at all, apart
        from how well the cycle finds them. Set at every start, like set_oracle."""
        self.class_labels = torch.as_tensor(labels, dtype=torch.long, device=self.bank.s.device)

    def get_extra_state(self):  # the negatives' generator travels with the banks in a checkpoint
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        # a CPU generator takes only a CPU byte tensor; a checkpoint mapped to a GPU has a GPU one
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))

    def forward(self, v, a, index, warmup=False, negatives=None):
        """v, a: (B, d) L2-normalised embeddings; index: (B,) bank slots of the batch.
        negatives (K,), optional: bank slots to use instead of a fresh draw (tests pass their own).
        Returns (loss, diagnostics). Call `self.bank.update(index, v, a)` after the optimiser's
        step."""
        bank = self.bank
        index = index.to(bank.v_bar.device)
        bank.check_index(index)
        if negatives is None:
            negatives = sample_negatives(bank.num_instances, self.K, self.generator)
        negatives = negatives.to(bank.v_bar.device)
        weighted = self.mode in ("weighted", "robust") and not warmup
        lam = self.lam if self.mode in ("soft", "robust") and not warmup else 0.0

        with torch.autocast(v.device.type, enabled=False):
            v, a = v.float(), a.float()
            v_pos, a_pos = bank.v_bar[index], bank.a_bar[index]                 # (B, d)
            v_neg, a_neg = bank.v_bar[negatives], bank.a_bar[negatives]         # (K, d)
            mask = negatives[None, :] == index[:, None]                         # (B, K) own slot
            mask = mask if mask.any() else None

            logits_v = candidate_logits(v, a_pos, a_neg) / self.tau             # v_i·ā_j/τ (B,1+K)
            logits_a = candidate_logits(a, v_pos, v_neg) / self.tau             # a_i·v̄_j/τ (B,1+K)

            with torch.no_grad():
                mu, sigma = bank.score_stats()
                s = bank.s[index]                                               # (B,)
                if not weighted:
                    w = torch.ones_like(s)                                      # (B,)
                elif self.oracle is not None:                                   # the ground truth
                    faulty, weight = self.oracle
                    w = torch.where(faulty.to(s.device)[index], weight, 1.0)
                else:
                    w = faulty_positive_weights(s, mu, sigma, self.delta, self.kappa, self.w_min)
                if lam == 0:
                    T_v = T_a = one_hot_targets(logits_v)                      # 1[j = i]
                else:
                    if self.class_labels is not None:                           # the ground truth
                        S_v = S_a = class_oracle_scores(self.class_labels, index, negatives, mask)
                    else:
                        S_v, S_a = softening_scores(self.strategy, v_pos, a_pos, v_neg, a_neg,
                                                    self.tau_s, mask)
                    T_v, T_a = soft_targets(S_v, lam), soft_targets(S_a, lam)   # (B, 1+K)

            # Σ_i w_i over the whole batch: with several processes each holds a share, and DDP
            # averages their gradients, so each divides by the processes' mean Σ w
            w_sum = mean_over_ranks(w.sum())
            w_sum = torch.where(w_sum > 0, w_sum, 1.0)  # an oracle's 0 on a whole batch: no loss
            L_v = soft_cross_entropy(logits_v, T_v, mask)                       # (B,) per row
            L_a = soft_cross_entropy(logits_a, T_a, mask)
            loss_v = (w * L_v).sum() / w_sum                                    # -log P(ā|v)
            loss_a = (w * L_a).sum() / w_sum                                    # -log P(v̄|a)

        diagnostics = {
            "loss_v2a": loss_v.detach(), "loss_a2v": loss_a.detach(),
            "row_loss": (L_v + L_a).detach(),                                   # (B,) unweighted
            "weights": w, "mean_weight": w.mean(), "lam": lam,                  # λ applied
            "target_on_positive": 0.5 * (T_v[:, 0].mean() + T_a[:, 0].mean()),
            "negatives": negatives, "targets_v": T_v, "targets_a": T_a,
        }
        return loss_v + loss_a, diagnostics
