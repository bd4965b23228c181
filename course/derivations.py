"""Exercises 6-8: results to derive on paper first, then write as a function the tests check.

Each asks why the method is built as it is: why the weights w_i are constants and not learned, why a
row's own instance drawn as a negative is masked, and how far the detection of faulty positives
can go when some of them look clean. Write the derivation in your hand-in; the function is its
answer in a form the tests can check (`python course/exercises.py grade 6 7 8`).
"""
import math


def weight_gradient(row_loss, w):
    """Exercise 6. The weighted loss of a batch is L = Σ_i w_i ℓ_i / Σ_i w_i (RobustXIDLoss, with
    ℓ_i a row's loss). Derive ∂L/∂w_i, and return it for every row.

    row_loss, w: (B,) tensors, w > 0. Returns (B,). Then answer: when is ∂L/∂w_i > 0, and what
    would gradient descent do to the weights if they were parameters of the model?"""
    total = w.sum()
    return (row_loss - (w * row_loss).sum() / total) / total


def own_instance_floor(k):
    """Exercise 7. Row i's candidates are its positive ā_i and K negatives. Suppose the slot ā_i is
    among the negatives k times and is not masked, so those k candidates have exactly the
    positive's logit (sample_negatives draws distinct slots, so here k is 0 or 1; drawing with
    replacement, or a video that is in the dataset twice, gives more). As the model becomes perfect
    (the positive's logit far above every other candidate's), what value does -log P(ā_i | v_i)
    approach? Return it for an integer k >= 0.

    Then answer: how does the row's gradient with respect to v_i compare with the gradient of the
    same row with the copies masked, and why does losses.py mask them (`mask` in
    RobustXIDLoss.forward)?"""
    return math.log(1 + k)


def blind_share_auc(q):
    """Exercise 8. The detector ranks pairs by their bank score s_i = v̄_i·ā_i, low = faulty. Take
    one that scores every faulty pair below every clean pair, except a share q of the faulty pairs
    it cannot tell from clean ones: those get scores drawn from the clean pairs' distribution (an
    injected pair whose donor is of the same class differs from a clean one only in the timing of
    the wall hits). What ROC AUC does it reach? Return it for q in [0, 1].

    Then answer: about 10% of the injected pairs have a same-class donor. What AUC bound follows,
    and how much of the gap between the oracle runs' detection and 1 does it explain (lab 3)?"""
    return 1 - q / 2
