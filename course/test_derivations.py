"""The derivation exercises of course/derivations.py, each checked against a computation that does
not use the derived formula: autograd, a loss evaluated at its limit, a simulated detector.

A failing check says which way the student's value is off and what to check on paper, never the
value the derivation must reach: that value is the exercise."""
import math

import pytest
import torch

from derivations import blind_share_auc, own_instance_floor, weight_gradient


def test_weight_gradient_matches_autograd():
    """∂L/∂w_i of L = Σ_i w_i ℓ_i / Σ_i w_i, against autograd on three batches."""
    g = torch.Generator().manual_seed(0)
    for B in (2, 5, 32):
        row_loss = 5 + 3 * torch.rand(B, generator=g, dtype=torch.float64)
        w = (0.25 + 0.75 * torch.rand(B, generator=g, dtype=torch.float64)).requires_grad_()
        ((w * row_loss).sum() / w.sum()).backward()
        yours = weight_gradient(row_loss, w.detach())
        assert isinstance(yours, torch.Tensor) and yours.shape == (B,), (
            f"∂L/∂w_i for a batch of {B}: expected one value per row, shape ({B},); yours "
            f"{getattr(yours, 'shape', yours)}")
        assert torch.allclose(yours.double(), w.grad, rtol=1e-6, atol=1e-9), (
            f"∂L/∂w_i, batch of {B}: yours {[round(x, 5) for x in yours[:3].tolist()]}... is not what "
            f"autograd gets from L = Σ_i w_i ℓ_i / Σ_i w_i. Both the numerator and the denominator "
            f"depend on w_i (the quotient rule); and Σ_i w_i ∂L/∂w_i must be 0, since scaling every "
            f"weight by the same factor leaves L unchanged (yours: "
            f"{float((w.detach() * yours.double()).sum()):.4g})")


def test_weight_gradient_of_two_rows_by_hand():
    """Two rows, ℓ = (6, 10), w = (1, 1): L = 8; raising w_2 pulls L towards 10."""
    yours = weight_gradient(torch.tensor([6.0, 10.0]), torch.tensor([1.0, 1.0]))
    expected = torch.tensor([-1.0, 1.0])
    assert torch.allclose(torch.as_tensor(yours, dtype=torch.float32), expected), (
        f"∂L/∂w for ℓ = (6, 10), w = (1, 1), where L = 8: yours "
        f"{[round(float(x), 4) for x in torch.as_tensor(yours).flatten()]}. Check it on paper: "
        f"raising w_2 moves L towards ℓ_2 = 10, raising w_1 towards ℓ_1 = 6, so the two must have "
        f"opposite signs")


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_own_instance_floor_is_the_limit_of_a_perfect_model(k):
    """The row's loss with the positive and its k unmasked copies far above every other candidate:
    the limit the derivation must name."""
    K, margin = 12, 60.0
    logits = torch.full((1, 1 + K), -margin, dtype=torch.float64)
    logits[0, : 1 + k] = margin                      # the positive, then its k copies among the negatives
    limit = float(-logits.log_softmax(1)[0, 0])
    yours = own_instance_floor(k)
    assert math.isclose(float(yours), limit, rel_tol=1e-6, abs_tol=1e-9), (
        f"with ā_i drawn {k} times among the K = {K} negatives, a model that puts the positive "
        f"{2 * margin:.0f} logits above every other candidate has a row loss "
        f"{'above' if limit > float(yours) else 'below'} the floor yours gives, "
        f"{float(yours):.4f}. Check on paper which candidates keep probability as the others' "
        f"fall to 0, and what P(ā_i | v_i) tends to")


def simulated_auc(q, n=4000, seed=0):
    """A detector that puts faulty pairs below every clean one except a share q, which it scores
    like clean pairs; the AUC of -s by counting every (faulty, clean) pair, ties half."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, generator=g, dtype=torch.float64)
    blind = int(round(q * n))
    faulty = torch.cat([torch.randn(blind, generator=g, dtype=torch.float64),
                        torch.full((n - blind,), -100.0, dtype=torch.float64)])
    below = (faulty[:, None] < clean[None, :]).double().mean()
    ties = (faulty[:, None] == clean[None, :]).double().mean()
    return float(below + 0.5 * ties)


@pytest.mark.parametrize("q", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_blind_share_auc_matches_a_simulated_detector(q):
    """The AUC of the detector with a blind share q, against counting its pairs (n = 4000 each, so
    the sampling error is below 0.005)."""
    measured = simulated_auc(q)
    yours = float(blind_share_auc(q))
    ends = {0.0: "q = 0 is a perfect detector: AUC 1", 1.0: "q = 1 is a detector that sees nothing: AUC 0.5"}
    assert abs(yours - measured) < 0.005, (
        f"a detector blind to a share q = {q} of the faulty pairs (scored like clean ones) and perfect "
        f"on the rest: counting its 4000 x 4000 (faulty, clean) pairs gives an AUC "
        f"{'above' if measured > yours else 'below'} yours, {yours:.3f}. "
        + ends.get(q, "Check on paper q = 0 and q = 1 first, then the chance that a random faulty "
                      "pair scores below a random clean one, ties counted half"))
