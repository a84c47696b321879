"""Block swapping on a tiny FLUX transformer with a LoRA (fused modules included), on CPU through a host
backend whose evicted weights are NaN: the same loss and LoRA gradients as without swapping, with and
without gradient checkpointing and with fp8 base weights, a forward-only schedule for sampling, and sd-scripts' --blocks_to_swap
split with its limits."""

import pytest
import torch

from library.errors import UserError
from library.families.base import ModelComponents
from library.families.flux import FluxFamily, flux_swap_split
from library.tiny_models.sd import tiny_clip_text_model
from library.tiny_models.flux import tiny_flux_transformer, tiny_t5_encoder
from library.offload import HostTransferBackend, enable_block_swap
from library.quantized_base import quantize_linears
from networks.lora import create_network



def swap(transformer, blocks_to_swap, backend, **kwargs):
    """Block swap as the family places it: its block_swap_groups through library/offload.py."""
    groups = FluxFamily().block_swap_groups(transformer, blocks_to_swap)
    return enable_block_swap(transformer, groups, backend, **kwargs)


class PoisonBackend(HostTransferBackend):
    def host_view(self, master):
        return torch.full_like(master, float("nan") if master.is_floating_point() else -1)  # fp8 bits 0xFF: NaN


def lora_model(checkpointing: bool):
    transformer = tiny_flux_transformer(num_layers=4, num_single_layers=6)
    transformer.requires_grad_(False)
    parts = ModelComponents(denoiser=transformer, vae=None, text_encoders=[tiny_clip_text_model(), tiny_t5_encoder()],
                            tokenizers=[None, None], noise_scheduler=None)
    network = create_network(FluxFamily().lora_targets(parts), network_dim=4, network_alpha=4, train_text_encoder=False)
    torch.manual_seed(1)
    for module in network.modules_by_name.values():
        torch.nn.init.normal_(module.lora_up.weight, std=0.05)
    network.apply_to()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer, network


def step(transformer, network):
    torch.manual_seed(3)
    inputs = dict(hidden_states=torch.randn(2, 16, 64), encoder_hidden_states=torch.randn(2, 8, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.3, 0.8]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5, 3.5]))
    network.zero_grad(set_to_none=True)
    loss = transformer(**inputs, return_dict=False)[0].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing,fp8", [(False, False), (True, False), (True, True)])
def test_lora_step_with_swapped_blocks_matches(checkpointing, fp8):
    reference_model, reference_network = lora_model(checkpointing)
    transformer, network = lora_model(checkpointing)
    if fp8:  # --fp8_base with --blocks_to_swap: the swapped weights are the float8 ones
        quantize_linears(reference_model, "fp8", keep=FluxFamily.full_precision_modules)
        quantize_linears(transformer, "fp8", keep=FluxFamily.full_precision_modules)
    reference_loss, reference_grads = step(reference_model, reference_network)
    swapper = swap(transformer, 4, PoisonBackend(), record_events=True)  # 2 double + 4 single
    assert [len(swapper.resident_blocks(g)) for g in (0, 1)] == [2, 2]
    for _ in range(2):
        loss, grads = step(transformer, network)
        assert torch.equal(loss, reference_loss)
        assert grads.keys() == reference_grads.keys() and len(grads) == 2 * (4 * 10 + 6 * 3)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=1e-6)
    assert swapper.unscheduled_loads == 0
    assert [len(swapper.resident_blocks(g)) for g in (0, 1)] == [2, 2]
    runs = [e for e in swapper.events if e[0] == "run"]
    assert sum(1 for e in runs if e[3] == "backward") == (2 * 10 if checkpointing else 0)  # recomputations


def test_sampling_uses_the_forward_only_schedule():
    reference, _ = lora_model(False)
    transformer, _ = lora_model(False)
    swapper = swap(transformer, 4, PoisonBackend(), record_events=True)
    inputs = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(transformer(**inputs)[0], reference(**inputs)[0])
    loads = [e for e in swapper.events if e[0] == "load"]
    assert len(loads) == 2 + 2 + 2 * (4 + 6)  # initial residents, then each block once per forward
    assert swapper.unscheduled_loads == 0


def test_blocks_to_swap_split_and_limits():
    assert flux_swap_split(18, 19, 38) == (9, 18)  # sd-scripts: N // 2 double, 2 x the rest single
    assert flux_swap_split(35, 19, 38) == (17, 36)
    with pytest.raises(UserError, match="can swap at most 35"):
        flux_swap_split(36, 19, 38)
    with pytest.raises(UserError, match=r"\(2 double and 2 single blocks\) can swap at most 0"):
        flux_swap_split(1, 2, 2)
