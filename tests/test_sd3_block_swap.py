"""Block swapping on a tiny SD3 / SD3.5 MMDiT (6 joint blocks, the family's one swapped list), on CPU through
a host backend whose evicted weights are NaN: every block is resident when it runs (forward, backward and
checkpoint recomputation), never more than the budget is resident, the loss and LoRA gradients (and the
base gradients of a full fine-tune) equal those without swapping, a forward-only schedule for sampling,
and the --blocks_to_swap limit."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

from block_swap_checks import PoisonBackend, one_thread, replay_events  # noqa: F401 (autouse fixture)
from library.errors import UserError
from library.families.base import ModelComponents
from library.families.sd3 import SD3Family
from library.tiny_models.sd3 import CLIP_G_WIDTH, CLIP_L_WIDTH, tiny_sd3_clip, tiny_sd3_transformer
from library.offload import enable_block_swap
from networks.lora import create_network



def swap(transformer, blocks_to_swap, backend, **kwargs):
    """Block swap as the family places it: its block_swap_groups through library/offload.py."""
    groups = SD3Family().block_swap_groups(transformer, blocks_to_swap)
    return enable_block_swap(transformer, groups, backend, **kwargs)

NUM_BLOCKS, SWAPPED = 6, 4
BUDGET = NUM_BLOCKS - SWAPPED


def transformer_with_blocks(dual_attention: bool):
    base = tiny_sd3_transformer(dual_attention)
    torch.manual_seed(0)
    return SD3Transformer2DModel.from_config({**base.config, "num_layers": NUM_BLOCKS})


def lora_model(checkpointing: bool, dual_attention: bool = False):
    transformer = transformer_with_blocks(dual_attention)
    transformer.requires_grad_(False)
    parts = ModelComponents(denoiser=transformer, vae=None, tokenizers=[None, None, None], noise_scheduler=None,
                            text_encoders=[tiny_sd3_clip(CLIP_L_WIDTH, False), tiny_sd3_clip(CLIP_G_WIDTH, True), None])
    network = create_network(SD3Family().lora_targets(parts), network_dim=4, network_alpha=4, train_text_encoder=False)
    torch.manual_seed(1)
    for module in network.modules_by_name.values():
        torch.nn.init.normal_(module.lora_up.weight, std=0.05)
    network.apply_to()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer, network


def inputs(batch: int = 2) -> dict:
    torch.manual_seed(3)
    return dict(hidden_states=torch.randn(batch, 16, 8, 8), encoder_hidden_states=torch.randn(batch, 8, 96),
                pooled_projections=torch.randn(batch, CLIP_L_WIDTH + CLIP_G_WIDTH),
                timestep=torch.tensor([300.0, 800.0][:batch]), return_dict=False)


def step(transformer, trained):
    trained.zero_grad(set_to_none=True)
    loss = transformer(**inputs())[0].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None}


def assert_same_grads(grads, reference_grads, expected_count):
    assert grads.keys() == reference_grads.keys() and len(grads) == expected_count
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("checkpointing,dual_attention", [(False, False), (True, False), (True, True)])
def test_lora_step_with_swapped_blocks_matches(checkpointing, dual_attention):
    reference_model, reference_network = lora_model(checkpointing, dual_attention)
    transformer, network = lora_model(checkpointing, dual_attention)
    reference_loss, reference_grads = step(reference_model, reference_network)
    swapper = swap(transformer, SWAPPED, PoisonBackend(), record_events=True)
    assert swapper.resident_blocks(0) == [0, 1]
    assert all(torch.isnan(p).all() for p in transformer.transformer_blocks[NUM_BLOCKS - 1].parameters())  # poisoned
    for _ in range(2):
        loss, grads = step(transformer, network)
        assert torch.equal(loss, reference_loss)
        assert_same_grads(grads, reference_grads, 2 * len(network.modules_by_name))
    assert swapper.unscheduled_loads == 0
    assert swapper.resident_blocks(0) == [0, 1]
    counts = replay_events(swapper.events, "joint", NUM_BLOCKS, BUDGET)
    assert counts["forward"] == 2 * NUM_BLOCKS
    assert counts["backward"] == (2 * NUM_BLOCKS if checkpointing else 0)  # recomputations
    # initial residents, then per step: SWAPPED loads in forward and NUM_BLOCKS - BUDGET in backward
    assert counts["load"] == BUDGET + 2 * (SWAPPED + SWAPPED)


def test_full_fine_tune_gradients_match():
    reference = transformer_with_blocks(False).train()
    transformer = transformer_with_blocks(False).train()
    reference_loss, reference_grads = step(reference, reference)
    swapper = swap(transformer, SWAPPED, PoisonBackend(), trains_weights=True, record_events=True)
    loss, grads = step(transformer, transformer)
    assert torch.equal(loss, reference_loss)
    assert_same_grads(grads, reference_grads, len(list(reference.parameters())))
    replay_events(swapper.events, "joint", NUM_BLOCKS, BUDGET)
    assert swapper.unscheduled_loads == 0


def test_sampling_uses_the_forward_only_schedule():
    reference, _ = lora_model(False)
    transformer, _ = lora_model(False)
    swapper = swap(transformer, SWAPPED, PoisonBackend(), record_events=True)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(transformer(**inputs(1))[0], reference(**inputs(1))[0])
    counts = replay_events(swapper.events, "joint", NUM_BLOCKS, BUDGET)
    assert counts["load"] == BUDGET + 2 * NUM_BLOCKS  # initial residents, then each block once per forward
    assert counts["forward"] == 2 * NUM_BLOCKS and swapper.unscheduled_loads == 0
    assert swapper.resident_blocks(0) == [0, 1]


def test_blocks_to_swap_limit():
    transformer = tiny_sd3_transformer()  # 2 joint blocks: nothing can be swapped
    with pytest.raises(UserError, match="has 2 joint blocks and can swap at most 0"):
        swap(transformer, 1, PoisonBackend())
    with pytest.raises(UserError, match="has 6 joint blocks and can swap at most 4"):
        swap(transformer_with_blocks(False), 5, PoisonBackend())
