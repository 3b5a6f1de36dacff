import math

import pytest
import torch

from sempa_dist.loss import preference_loss


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_sigmoid_by_hand():
    pol = torch.tensor([[-10.0, -12.0], [-8.0, -7.0]])
    ref = torch.tensor([[-11.0, -11.0], [-8.0, -8.0]])
    losses, m = preference_loss(pol, ref, beta=0.5, loss_type="dpo")
    # example 0: rewards 0.5*(1) and 0.5*(-1): margin 1.0; example 1: 0 and 0.5: margin -0.5
    assert losses.tolist() == pytest.approx([-math.log(sig(1.0)), -math.log(sig(-0.5))], abs=1e-6)
    assert m["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert m["rewards/margin"].tolist() == pytest.approx([1.0, -0.5])
    assert m["rewards/chosen"].tolist() == pytest.approx([0.5, 0.0])


def test_label_smoothing_by_hand():
    pol, ref = torch.tensor([[-1.0, -3.0]]), torch.zeros(1, 2)
    losses, _ = preference_loss(pol, ref, beta=1.0, loss_type="dpo", label_smoothing=0.1)
    assert losses.item() == pytest.approx(-0.9 * math.log(sig(2.0)) - 0.1 * math.log(sig(-2.0)), abs=1e-6)


def test_ipo_by_hand_on_length_normalised_logprobs():
    """IPO scores mean log-probs: the loss divides the sums by the token counts itself."""
    counts = torch.tensor([[2, 4, 1]])
    pol = torch.tensor([[-1.0, -2.0, -4.0]]) * counts
    ref = torch.tensor([[-1.5, -1.5, -1.5]]) * counts
    losses, m = preference_loss(pol, ref, beta=0.25, loss_type="ipo", counts=counts)
    # h_k = (pol0 - polk) - (ref0 - refk) on means: 1.0 and 3.0; target 1/(2*0.25) = 2
    assert losses.item() == pytest.approx(((1 - 2) ** 2 + (3 - 2) ** 2) / 2)
    assert m["logps/chosen"].item() == pytest.approx(-1.0)  # the metrics report what the loss scored
    with pytest.raises(ValueError, match="ipo needs the responses' token counts"):
        preference_loss(pol, ref, beta=0.25, loss_type="ipo")


def test_plackett_luce_by_hand_and_equals_dpo_for_k1():
    pol = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.zeros(1, 3)
    losses, m = preference_loss(pol, ref, beta=1.0, loss_type="plackett_luce")
    expected = -math.log(math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert m["rewards/accuracy"].item() == 1.0
    torch.manual_seed(0)
    pol, ref = torch.randn(64, 2) * 5, torch.randn(64, 2) * 5
    for beta in (0.01, 0.1, 2.0):
        pl, _ = preference_loss(pol, ref, beta, "plackett_luce")
        dpo, _ = preference_loss(pol, ref, beta, "dpo")
        torch.testing.assert_close(pl, dpo, atol=1e-6, rtol=1e-6)


def test_gradient_does_not_reach_the_reference():
    pol = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    losses, _ = preference_loss(pol, ref, 0.1, "dpo")
    losses.sum().backward()
    assert ref.grad is None and pol.grad is not None and pol.grad[0, 0] < 0 < pol.grad[0, 1]


def test_bad_shapes_and_type():
    with pytest.raises(ValueError, match="1 \\+ K"):
        preference_loss(torch.zeros(3), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="unknown loss type"):
        preference_loss(torch.zeros(2, 2), torch.zeros(2, 2), 0.1, "hinge")
