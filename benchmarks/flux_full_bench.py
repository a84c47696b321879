"""The FLUX.1 model and inputs of benchmarks/gpu_check.py, and its full fine-tuning step (the `flux_full` section).

`build_flux_transformer` draws a FLUX.1 transformer with random bf16 weights where it will run (real or tiny
dimensions); `flux_batch` a batch of random latents and text conditioning for it. `FluxFullBench` runs
FLUX.1 full fine-tuning the way flux_train.py does: FluxFamily in full mode, Adafactor stepped inside the
backward pass (--fused_backward_pass, library/training/fused_backward.py), bf16 weights without fp32
master copies (--full_bf16), gradient checkpointing, StepLoss, and --blocks_to_swap N through
library/offload.py with trained weights (a swapped block's updated weights go back to host memory).
"""

from __future__ import annotations


def build_flux_transformer(dims: dict, device):
    """FluxTransformer2DModel at `dims` (double, single, heads, head_dim, rope, text_width, pooled) with random
    bf16 weights drawn on `device` (no host copy), frozen."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=dims["double"], num_single_layers=dims["single"],
                attention_head_dim=dims["head_dim"], num_attention_heads=dims["heads"],
                joint_attention_dim=dims["text_width"], pooled_projection_dim=dims["pooled"], guidance_embeds=True,
                axes_dims_rope=dims["rope"])
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False)
    return transformer


def flux_batch(dims: dict, device) -> dict:
    """One sample: latents (16 x latent_side^2), T5 states (text_tokens x text_width) and pooled CLIP, seeded."""
    import torch

    generator = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return {"latents": randn(1, 16, dims["latent_side"], dims["latent_side"]),
            "conditioning": {"t5_hidden_states": randn(1, dims["text_tokens"], dims["text_width"]).to(torch.bfloat16),
                             "pooled": randn(1, dims["pooled"]).to(torch.bfloat16)},
            "loss_weights": torch.ones(1, device=device)}


class FluxFullBench:
    """flux_train.py's step on `transformer` (already on the device): configure(N) swaps N blocks (sd-scripts'
    split), step() trains one step, release() brings every block back to the device."""

    def __init__(self, transformer, dims: dict, device, work_dir: str):
        import torch

        from library.config.arguments import parse_training_args
        from library.families.base import ModelComponents
        from library.families.flux import FluxFamily
        from library.tiny_models.flux import tiny_t5_encoder
        from library.tiny_models.sd import tiny_clip_text_model
        from library.training.distributed import build_accelerator
        from library.training.modes import make_mode
        from library.training.step_loss import StepLoss

        self.torch, self.transformer, self.device = torch, transformer, device
        self.family, self.args = parse_training_args(FluxFamily(), "full", [
            "--pretrained_model_name_or_path", "random-flux1-dev", "--output_dir", work_dir,
            "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
            "warmup_init=False", "--learning_rate", "1e-6", "--fused_backward_pass", "--mixed_precision", "bf16",
            "--full_bf16", "--gradient_checkpointing", "--max_grad_norm", "0",
            "--t5xxl_max_token_length", str(dims["text_tokens"])])
        self.components = ModelComponents(denoiser=transformer, vae=None,
                                          text_encoders=[tiny_clip_text_model(), tiny_t5_encoder()],
                                          tokenizers=[None, None], noise_scheduler=None)
        self.mode = make_mode(self.family.settings.kind, self.family, self.args)
        self.param_groups = self.mode.prepare(self.components)  # the transformer's weights train
        transformer.enable_gradient_checkpointing()
        transformer.train()
        self.accelerator = build_accelerator(self.args)
        self.step_loss = StepLoss(self.family, self.components, self.args, self.accelerator, None,
                                  torch.bfloat16, False)
        self.batch = flux_batch(dims, device.device)
        self.swapper, self.fused, self.optimizer, self.step_index = None, None, None, 0

    def configure(self, blocks_to_swap: int) -> None:
        """A fresh Adafactor with the fused step; blocks_to_swap blocks parked in (pinned) host memory."""
        from library.offload import enable_block_swap
        from library.training.fused_backward import fused_step_for
        from library.training.optimizers import build_optimizer

        if blocks_to_swap:
            groups = self.family.block_swap_groups(self.transformer, blocks_to_swap)
            for _, blocks, _ in groups:
                for param in blocks.parameters():
                    param.data = self._host_copy(param.data)
            self.swapper = enable_block_swap(self.transformer, groups, self.device.transfer_backend(),
                                             trains_weights=True)
        self.fused = fused_step_for(self.args)
        self.optimizer = build_optimizer(self.args, self.fused.param_groups(self.param_groups, self.family,
                                                                            self.components))
        self.fused.attach(self.optimizer, 1)

    def _host_copy(self, tensor):
        host = self.torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.device.cuda)
        host.copy_(tensor)
        return host

    def step(self) -> float:
        """One flux_train.py step: the loss, backward with Adafactor stepping each weight as its gradient is
        complete (inside backward), then the fused step's end."""
        generators = [self.torch.Generator(self.device.device).manual_seed(1000 + self.step_index)]
        self.step_index += 1
        loss = self.step_loss.sample_losses(self.batch, generators).sum()
        self.fused.arm(loss.item())
        self.accelerator.backward(loss)
        self.fused.finish()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item()

    def swapped_bytes(self) -> int:
        return self.swapper.swapped_bytes() if self.swapper else 0

    def release(self) -> None:
        """Hooks off, optimizer state dropped, every block parameter on the device again."""
        self.fused.remove()
        self.optimizer = self.fused = None
        if self.swapper is not None:
            self.swapper.backend.synchronize()
            self.swapper.remove()
            self.swapper = None
            for param in self.transformer.parameters():
                param.data = param.data.to(self.device.device)
