"""Per-sample loss: each loss type on hand-computed numbers, and masked loss."""

import pytest
import torch

from library.training.losses import elementwise_loss, per_sample_loss, resize_mask_to_latents


def pair():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # [2,1,2,2]
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.5, -0.5], [0.0, 1.0]]]])
    return pred, target


def test_l2_and_l1_exact():
    pred, target = pair()
    assert per_sample_loss(pred, target, "l2").tolist() == [(0 + 4 + 9 + 16) / 4, (0.25 + 0.25 + 0 + 1) / 4]
    assert per_sample_loss(pred, target, "l1").tolist() == [(0 + 2 + 3 + 4) / 4, (0.5 + 0.5 + 0 + 1) / 4]


def test_huber_and_smooth_l1_use_per_sample_threshold():
    pred, target = pair()
    c = torch.tensor([1.0, 0.5])
    diffs = [[0.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.0, 1.0]]
    huber = [sum(2 * ci * ((d * d + ci * ci) ** 0.5 - ci) for d in ds) / 4 for ds, ci in zip(diffs, [1.0, 0.5])]
    smooth = [sum(2 * ((d * d + ci * ci) ** 0.5 - ci) for d in ds) / 4 for ds, ci in zip(diffs, [1.0, 0.5])]
    assert per_sample_loss(pred, target, "huber", c).tolist() == pytest.approx(huber, rel=1e-6)
    assert per_sample_loss(pred, target, "smooth_l1", c).tolist() == pytest.approx(smooth, rel=1e-6)
    assert huber[0] == pytest.approx((0 + 2 * (5**0.5 - 1) + 2 * (10**0.5 - 1) + 2 * (17**0.5 - 1)) / 4)


def test_huber_needs_threshold_and_unknown_type_fails():
    pred, target = pair()
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(pred, target, "huber")
    with pytest.raises(ValueError, match="unknown loss type"):
        elementwise_loss(pred, target, "l3")


def test_loss_is_float32_per_sample_for_half_inputs():
    pred, target = pair()
    loss = per_sample_loss(pred.half(), target.bfloat16(), "l2")
    assert loss.dtype == torch.float32 and loss.shape == (2,)


def test_resize_mask_to_latents_area_average():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0
    mask[..., :2, 4:] = 1.0  # top-right quarter of the right half
    small = resize_mask_to_latents(mask, (2, 2))
    assert small.shape == (1, 1, 2, 2)
    assert small[0, 0].tolist() == [[1.0, 0.5], [1.0, 0.0]]
    assert resize_mask_to_latents(mask[:, 0], (2, 2)).tolist() == small.tolist()  # [B,H,W] accepted


def test_masked_loss_ignores_masked_pixels():
    pred = torch.zeros(1, 4, 2, 2)
    target = torch.zeros(1, 4, 2, 2)
    target[..., 0, 1] = 100.0  # huge error only where the mask is 0
    target[..., 1, 0] = 2.0
    mask = torch.ones(1, 1, 16, 16)
    mask[..., :8, 8:] = 0.0
    loss = per_sample_loss(pred, target, "l2", mask=mask)
    assert loss.tolist() == [4.0 * 4 / 16]  # mean over all 16 elements, masked ones count as 0


def test_mask_needs_image_shaped_predictions():
    with pytest.raises(ValueError, match="B,C,H,W"):
        per_sample_loss(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3), "l2", mask=torch.ones(2, 1, 4, 4))
