"""One prepared GPU check: VRAM, step time and exactness of LoRA training and FLUX.1 full fine-tuning at real model sizes.

Sections (each one's figures or error go into the JSON as soon as it ends, so a timeout or a failing
section still leaves the others):
- `flux`: FLUX.1-dev at its real dimensions (19 double + 38 single blocks, width 3072 = 24 heads of 128,
  T5 width 4096, pooled CLIP 768, guidance embedding; random bf16 weights created on the device), LoRA
  rank 16 on sd-scripts' targets (networks.lora through FluxFamily.lora_targets), 1024x1024 (4096 image
  tokens), T5 length 512, batch 1, gradient checkpointing, AdamW, one training step the way the trainer
  runs it (StepLoss: flow-matching noise, FluxFamily.predict under accelerate's bf16 autocast,
  accelerator.backward, optimizer step). For --blocks_to_swap 0, 9, 18, 27, 36, with bf16 and with fp8
  base weights (library/quantized_base.py): peak torch.cuda.max_memory_allocated, median step time, and the first
  step's loss and LoRA gradients against the no-swap run of the same precision (same inputs, same seed,
  same starting LoRA weights). The model is built once and re-placed per configuration; block weights
  wait in pinned host memory between configurations.
- `flux_baseline`: the no-swap bf16 step of the same model and LoRA as a hand-written loop (plain
  autocast forward, MSE, backward, torch AdamW), to compare with the trainer's step.
- `flux_full`: FLUX.1 full fine-tuning at the same dimensions as flux_train.py runs it (flux_full_bench.py:
  bf16 weights trained without fp32 copies, Adafactor stepped inside the backward pass, gradient
  checkpointing) with --blocks_to_swap 0, 18 and 35 trained blocks: peak VRAM and median step time.
- `sdxl`: SDXL's UNet at its real dimensions (diffusers' SDXL config, random bf16 weights), LoRA rank 16
  on SDXLFamily's targets, 1024 px (128x128 latents), batch 1: step time and peak VRAM with and
  without gradient checkpointing.
`fits` in each configuration names the cards (12, 16, 24 GB) whose memory holds its peak reservation
plus 0.75 GiB for the CUDA context.

Without CUDA the same code runs at tiny widths on the CPU (the block counts stay real, so the same
--blocks_to_swap values apply); swapping then copies between CPU tensors (HostTransferBackend): the
schedule and the exactness are checked, while peak VRAM, the stream overlap and the timings' meaning
need CUDA; the JSON's `needs_cuda` lists those parts. Nothing is downloaded.

Run: python benchmarks/gpu_check.py --json gpu_check.json [--tiny] [--sections flux flux_full sdxl]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.offload import CudaTransferBackend, HostTransferBackend  # noqa: E402  (torch loads lazily)

SWAPS = (0, 9, 18, 27, 35)  # 35 is FLUX.1's largest under sd-scripts' split (17 double + 36 single)
FULL_SWAPS = (0, 18, 35)  # full fine-tuning; 36 would leave one of the 19 double blocks on the GPU (2 must stay)
CARDS_GB = (12, 16, 24)
CUDA_CONTEXT_GIB = 0.75
NEEDS_CUDA = ["peak VRAM (torch.cuda.max_memory_allocated)", "block-swap transfers on a side CUDA stream with "
              "pinned memory (on CPU: HostTransferBackend copies)", "step times at real model sizes",
              "fp8 storage at real sizes (on CPU: fp8 storage at tiny sizes)"]

REAL_FLUX = dict(double=19, single=38, heads=24, head_dim=128, rope=(16, 56, 56), text_width=4096, pooled=768,
                 latent_side=128, text_tokens=512)
TINY_FLUX = dict(double=19, single=38, heads=2, head_dim=16, rope=(4, 6, 6), text_width=32, pooled=32,
                 latent_side=8, text_tokens=8)
REAL_SDXL = dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, text_embeds=1280, latent_side=128)
TINY_SDXL = dict(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 4, 8), cross_attention_dim=96, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 64, text_embeds=64, latent_side=16)


# ---- report -----------------------------------------------------------------------------------------

class Report:
    """The JSON written after every section and configuration."""

    def __init__(self, path: str, meta: dict):
        self.path, self.data = path, {"meta": meta, "sections": {}}

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {})

    def write(self) -> None:
        if not self.path:
            return
        temporary = self.path + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(self.data, handle, indent=1)
        os.replace(temporary, self.path)


def run_section(report: Report, name: str, function, *args) -> None:
    """Runs one section; an exception is recorded in the JSON and the next section still runs."""
    started = time.perf_counter()
    entry = report.section(name)
    try:
        function(entry, report, *args)
        entry["status"] = "ok"
    except Exception as error:  # a failing section must not stop the others
        entry["status"] = "error"
        entry["error"] = f"{type(error).__name__}: {error}"
        entry["traceback"] = traceback.format_exc(limit=20)
        print(f"[{name}] failed: {entry['traceback']}", flush=True)
    entry["seconds"] = round(time.perf_counter() - started, 1)
    release_memory()
    report.write()


def release_memory() -> None:
    """Frees cached device memory; after a CUDA error (the context is lost) there is nothing to free."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception as error:  # a sticky CUDA error: the section that caused it reports it
            print(f"empty_cache after an error: {type(error).__name__}", flush=True)


def run_isolated(report: Report, names: list, options, argv: list) -> None:
    """Sections in their own process (a CUDA error such as an illegal address ends the whole
    process's context), its JSON merged into the report."""
    import subprocess

    name = names[0]
    part = f"{options.json or 'gpu_check.json'}.{name}.json"
    command = [sys.executable, os.path.abspath(__file__), *argv, "--sections", *names, "--json", part, "--in_process"]
    started = time.perf_counter()
    completed = subprocess.run(command)
    try:
        with open(part) as handle:
            sections = json.load(handle)["sections"]
        os.remove(part)
    except (OSError, ValueError, KeyError):
        sections = {}
    for key, value in sections.items():
        report.data["sections"][key] = value
    entry = report.section(name)
    if entry.get("status") not in ("ok", "error"):
        entry.update(status="error", error=f"the section's process ended with code {completed.returncode} "
                                           "before it finished")
    entry["process_seconds"] = round(time.perf_counter() - started, 1)
    report.write()


class Device:
    """The device, its synchronization and memory statistics (None on the CPU)."""

    def __init__(self, name: str):
        import torch

        self.torch, self.device = torch, torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> dict:
        if not self.cuda:
            return {"peak_allocated_gib": None, "peak_reserved_gib": None, "fits": None}
        allocated = self.torch.cuda.max_memory_allocated(self.device) / 2**30
        reserved = self.torch.cuda.max_memory_reserved(self.device) / 2**30
        fits = [f"{gb} GB" for gb in CARDS_GB if reserved + CUDA_CONTEXT_GIB <= gb * 1e9 / 2**30]
        return {"peak_allocated_gib": round(allocated, 2), "peak_reserved_gib": round(reserved, 2), "fits": fits}

    def transfer_backend(self):
        return ParkedCudaBackend(self.device) if self.cuda else ParkedHostBackend()


class ParkedCudaBackend(CudaTransferBackend):
    """CudaTransferBackend whose host masters are the parked (pinned) tensors themselves: re-placing the
    model for the next configuration copies nothing. Only for frozen weights (LoRA), as here."""

    def make_master(self, tensor):
        return tensor if tensor.device.type == "cpu" and tensor.is_pinned() else super().make_master(tensor)


class ParkedHostBackend(HostTransferBackend):
    def make_master(self, tensor):
        return tensor.detach()


def timed_steps(device: Device, step, count: int) -> list[float]:
    times = []
    for _ in range(count):
        device.sync()
        start = time.perf_counter()
        step()
        device.sync()
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 1)


# ---- FLUX -------------------------------------------------------------------------------------------

def flux_dims(options) -> dict:
    dims = dict(TINY_FLUX if options.tiny else REAL_FLUX)
    dims.update({k: getattr(options, k) for k in ("double", "single") if getattr(options, k)})
    return dims


class FluxBench:
    """The FLUX.1 model, its LoRA, the trainer's step pieces and the placement per configuration."""

    def __init__(self, options, device: Device):
        import torch

        self.options, self.device, self.torch = options, device, torch
        self.dims = flux_dims(options)
        self.transformer = self._build_transformer()
        self._build_training()
        self.parked: list = []  # (parameter, host tensor) of every block parameter while parked

    def _build_transformer(self):
        from flux_full_bench import build_flux_transformer

        return build_flux_transformer(self.dims, self.device.device)

    def _build_training(self) -> None:
        from library.config.arguments import parse_training_args
        from library.families.base import ModelComponents
        from library.families.flux import FluxFamily
        from library.tiny_models.sd import tiny_clip_text_model
        from library.tiny_models.flux import tiny_t5_encoder
        from library.training.distributed import build_accelerator
        from library.training.modes import make_mode
        from library.training.step_loss import StepLoss, TrainableModules
        from library.training.trainer import disable_cudnn_attention

        torch = self.torch
        self.family, self.args = parse_training_args(FluxFamily(), "network", [
            "--pretrained_model_name_or_path", "random-flux1-dev", "--output_dir", self.options.work_dir,
            "--network_module", "networks.lora", "--network_dim", str(self.options.rank), "--network_alpha",
            str(self.options.rank), "--network_train_unet_only", "--optimizer_type", "AdamW",
            "--learning_rate", "1e-4", "--mixed_precision", "bf16", "--gradient_checkpointing",
            "--max_grad_norm", "0", "--t5xxl_max_token_length", str(self.dims["text_tokens"])])
        self.components = ModelComponents(denoiser=self.transformer, vae=None,
                                          text_encoders=[tiny_clip_text_model(), tiny_t5_encoder()],
                                          tokenizers=[None, None], noise_scheduler=None)
        self.mode = make_mode(self.family.settings.kind, self.family, self.args)
        self.param_groups = self.mode.prepare(self.components)
        self.network = self.mode.network
        self.network.to(self.device.device)
        generator = torch.Generator().manual_seed(1)
        for name, param in self.network.named_parameters():  # a trained LoRA: up weights are not zero
            if "lora_up" in name:
                param.data.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        self.initial_lora = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.accelerator = build_accelerator(self.args)
        disable_cudnn_attention(self.accelerator.device)  # what Trainer.train does
        self.wrapper = self.accelerator.prepare(TrainableModules([self.network]))
        self.step_loss = StepLoss(self.family, self.components, self.args, self.accelerator, None,
                                  torch.bfloat16, False)
        self.batch = self._batch()

    def _batch(self) -> dict:
        from flux_full_bench import flux_batch

        return flux_batch(self.dims, self.device.device)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    # ----- one training step as the trainer runs it ----------------------------------------------
    def new_optimizer(self):
        from library.training.optimizers import build_optimizer

        self.network.load_state_dict(self.initial_lora)
        self.step_index = 0
        return build_optimizer(self.args, self.param_groups)

    def trainer_step(self, optimizer, keep_grads: bool = False):
        """One step (noise from a per-step seed, so every configuration sees the same inputs)."""
        torch = self.torch
        generators = [torch.Generator(self.device.device).manual_seed(1000 + self.step_index)]
        self.step_index += 1
        losses = self.step_loss.sample_losses(self.batch, generators, forward=self.wrapper)
        loss = losses.sum()
        self.accelerator.backward(loss)
        grads = None
        if keep_grads:
            grads = {n: p.grad.detach().float().clone() for n, p in self.network.named_parameters()
                     if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item(), grads

    # ----- placement -----------------------------------------------------------------------------
    def block_parameters(self) -> list:
        return [p for blocks in (self.transformer.transformer_blocks, self.transformer.single_transformer_blocks)
                for p in blocks.parameters()]

    def park_blocks(self) -> None:
        """Every block's weights into (pinned) host memory; the rest of the model stays on the device."""
        torch = self.torch
        self.parked = []
        for param in self.block_parameters():
            host = torch.empty(param.shape, dtype=param.dtype, pin_memory=self.device.cuda)
            host.copy_(param.data)
            self.parked.append((param, host))
            param.data = host
        self.device.sync()

    def unpark_blocks(self) -> None:
        for param, host in self.parked:
            param.data = host.to(self.device.device)
        self.parked = []

    def restore_parked(self) -> None:
        """After a swap configuration: every block parameter points at its parked tensor again."""
        for param, host in self.parked:
            param.data = host

    def to_fp8(self) -> None:
        from library.families.flux import FluxFamily
        from library.quantized_base import quantize_linears

        self.unpark_blocks()
        release_memory()
        quantize_linears(self.transformer, "fp8", keep=FluxFamily.full_precision_modules, device=self.device.device)

    # ----- one configuration ---------------------------------------------------------------------
    def run_config(self, precision: str, blocks_to_swap: int) -> dict:
        from library.offload import enable_block_swap

        torch, device = self.torch, self.device
        swapper = None
        try:
            if blocks_to_swap:
                groups = self.family.block_swap_groups(self.transformer, blocks_to_swap)
                swapper = enable_block_swap(self.transformer, groups, device.transfer_backend())
            optimizer = self.new_optimizer()
            device.reset_peak()
            loss, grads = self.trainer_step(optimizer, keep_grads=True)
            times = timed_steps(device, lambda: self.trainer_step(optimizer), self.options.warmup + self.options.steps)
            result = {"precision": precision, "blocks_to_swap": blocks_to_swap,
                      "step_ms": median_ms(times[self.options.warmup:]),
                      "steps_timed": self.options.steps, "first_loss": loss, **device.peaks()}
            if swapper is not None:
                result["swapped_bytes"] = swapper.swapped_bytes()
                result["swapped_gib"] = round(swapper.swapped_bytes() / 2**30, 2)
                result["unscheduled_loads"] = swapper.unscheduled_loads
            return result, grads
        except Exception as error:  # out of memory or a bug: recorded, the next configuration still runs
            name = "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else type(error).__name__
            return {"precision": precision, "blocks_to_swap": blocks_to_swap, "error": f"{name}: {error}",
                    "traceback": traceback.format_exc(limit=12)}, None
        finally:
            if swapper is not None:
                swapper.remove()
                self.restore_parked()
            release_memory()


def compare_grads(loss: float, grads: dict, reference_loss: float, reference: dict) -> dict:
    """Relative differences of the loss and the LoRA gradients against the no-swap run."""
    import torch

    worst, squared_difference, squared_reference = 0.0, 0.0, 0.0
    for name, ref in reference.items():
        difference = (grads[name] - ref).norm().item()
        norm = ref.norm().item()
        squared_difference += difference**2
        squared_reference += norm**2
        if norm > 0:
            worst = max(worst, difference / norm)
    total = (squared_difference / squared_reference) ** 0.5 if squared_reference else float("nan")
    finite = all(torch.isfinite(g).all().item() for g in grads.values())
    loss_rel = abs(loss - reference_loss) / max(abs(reference_loss), 1e-12)
    return {"loss_rel_diff": loss_rel, "grad_rel_diff": total, "worst_module_grad_rel_diff": worst,
            "grads_finite": finite, "exact_to_bf16": bool(finite and loss_rel < 1e-3 and total < 1e-2)}


def flux_section(entry: dict, report: Report, options, device: Device) -> None:
    import torch

    bench = FluxBench(options, device)
    print(f"flux: {bench.parameter_count() / 1e9:.2f} B parameters built on {device.device}, LoRA applied", flush=True)
    entry["model"] = {"parameters_billion": round(bench.parameter_count() / 1e9, 3), **bench.dims,
                      "lora_rank": options.rank, "lora_parameters_million":
                      round(sum(p.numel() for p in bench.network.parameters()) / 1e6, 2),
                      "gradient_checkpointing": True, "batch": 1, "optimizer": "AdamW"}
    entry["configs"] = []
    report.write()
    for precision in ("bf16", "fp8"):
        if precision == "fp8":
            bench.to_fp8()
        reference = None
        for n in options.swaps:
            if n and not bench.parked:
                bench.park_blocks()
            if not n and bench.parked:
                bench.unpark_blocks()
            result, grads = bench.run_config(precision, n)
            if grads is not None and reference is None and n == 0:
                reference = (result["first_loss"], grads)
            elif grads is not None and reference is not None:
                result["exactness_vs_no_swap"] = compare_grads(result["first_loss"], grads, *reference)
            entry["configs"].append(result)
            print_config(result)
            report.write()
            if precision == "bf16" and n == 0 and "flux_baseline" in options.sections:
                run_section(report, "flux_baseline", baseline_section, bench)
        del reference
        release_memory()
    bench.unpark_blocks()


def baseline_section(entry: dict, report: Report, bench: FluxBench) -> None:
    """The same no-swap bf16 model and LoRA, driven by a plain loop (no StepLoss, accelerate or family)."""
    import torch
    import torch.nn.functional as F

    from library.families.flux import image_position_ids, pack_latents

    device, d = bench.device, bench.dims
    bench.network.load_state_dict(bench.initial_lora)
    params = [p for p in bench.network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents = bench.batch["latents"]
    side = d["latent_side"]
    t5 = bench.batch["conditioning"]["t5_hidden_states"]
    fixed = dict(encoder_hidden_states=t5, pooled_projections=bench.batch["conditioning"]["pooled"],
                 img_ids=image_position_ids(side, side, device.device, torch.bfloat16),
                 txt_ids=torch.zeros(t5.shape[1], 3, device=device.device, dtype=torch.bfloat16),
                 guidance=torch.full((1,), 3.5, device=device.device), return_dict=False)

    def step():
        noise = torch.randn_like(latents)
        sigma = torch.rand(1, device=device.device)
        noisy = (1 - sigma) * latents + sigma * noise
        with torch.autocast(device.device.type, dtype=torch.bfloat16):
            prediction = bench.transformer(hidden_states=pack_latents(noisy).to(torch.bfloat16),
                                           timestep=sigma.to(torch.bfloat16), **fixed)[0]
        loss = F.mse_loss(prediction.float(), pack_latents(noise - latents))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    device.reset_peak()
    times = timed_steps(device, step, 1 + bench.options.warmup + bench.options.steps)
    entry.update({"what": "hand-written loop, bf16, no swap", "step_ms": median_ms(times[1 + bench.options.warmup:]),
                  **device.peaks()})
    print(f"flux baseline (hand-written loop): {entry['step_ms']} ms", flush=True)


def flux_full_section(entry: dict, report: Report, options, device: Device) -> None:
    """FLUX.1 full fine-tuning as flux_train.py runs it (flux_full_bench.py) with 0/18/35 trained blocks swapped."""
    from flux_full_bench import FluxFullBench, build_flux_transformer

    dims = flux_dims(options)
    transformer = build_flux_transformer(dims, device.device)
    bench = FluxFullBench(transformer, dims, device, options.work_dir)
    parameters = sum(p.numel() for p in transformer.parameters())
    print(f"flux_full: {parameters / 1e9:.2f} B trained parameters on {device.device}", flush=True)
    entry["model"] = {"parameters_billion": round(parameters / 1e9, 3), **dims, "weights": "bf16 (--full_bf16)",
                      "optimizer": "Adafactor, --fused_backward_pass", "gradient_checkpointing": True, "batch": 1}
    entry["configs"] = []
    for n in options.full_swaps:
        entry["configs"].append(full_config(bench, n, options, device))
        print_config(entry["configs"][-1])
        report.write()


def full_config(bench, blocks_to_swap: int, options, device: Device) -> dict:
    import torch

    result = {"precision": "bf16 full", "blocks_to_swap": blocks_to_swap}
    try:
        bench.configure(blocks_to_swap)
        device.reset_peak()
        first_loss = bench.step()
        times = timed_steps(device, bench.step, options.warmup + options.steps)
        result.update(step_ms=median_ms(times[options.warmup:]), steps_timed=options.steps, first_loss=first_loss,
                      swapped_bytes=bench.swapped_bytes(), swapped_gib=round(bench.swapped_bytes() / 2**30, 2),
                      **device.peaks())
        if bench.swapper is not None:
            result["unscheduled_loads"] = bench.swapper.unscheduled_loads
    except Exception as error:  # out of memory or a bug: recorded, the next configuration still runs
        name = "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else type(error).__name__
        result.update(error=f"{name}: {error}", traceback=traceback.format_exc(limit=12))
    finally:
        bench.release()
        release_memory()
    return result


def print_config(result: dict) -> None:
    if "error" in result:
        print(f"flux {result['precision']} swap {result['blocks_to_swap']:2d}: {result['error'][:200]}", flush=True)
        return
    exact = result.get("exactness_vs_no_swap", {})
    print(f"flux {result['precision']} swap {result['blocks_to_swap']:2d}: step {result['step_ms']} ms, "
          f"peak {result['peak_allocated_gib']} GiB, loss {result['first_loss']:.5f}"
          + (f", grad rel diff {exact['grad_rel_diff']:.2e}" if exact else ""), flush=True)


# ---- SDXL -------------------------------------------------------------------------------------------

def sdxl_section(entry: dict, report: Report, options, device: Device) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from library.families.base import ModelComponents
    from library.families.sdxl import SDXLFamily
    from library.tiny_models.sd import tiny_clip_text_model
    from networks.lora import create_network

    d = TINY_SDXL if options.tiny else REAL_SDXL
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device.device):
            unet = UNet2DConditionModel(
                sample_size=d["latent_side"], in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=d["block_out_channels"],
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=d["transformer_layers_per_block"],
                attention_head_dim=d["attention_head_dim"], use_linear_projection=True,
                cross_attention_dim=d["cross_attention_dim"], addition_embed_type="text_time",
                addition_time_embed_dim=d["addition_time_embed_dim"],
                projection_class_embeddings_input_dim=d["projection_class_embeddings_input_dim"], norm_num_groups=32)
    finally:
        torch.set_default_dtype(previous)
    unet.requires_grad_(False)
    parts = ModelComponents(denoiser=unet, vae=None, text_encoders=[tiny_clip_text_model(), tiny_clip_text_model(
        64, with_projection=True)], tokenizers=[None, None], noise_scheduler=None)
    network = create_network(SDXLFamily().lora_targets(parts), network_dim=options.rank, network_alpha=options.rank,
                             train_text_encoder=False)
    network.apply_to()
    network.to(device.device)
    entry["model"] = {"parameters_billion": round(sum(p.numel() for p in unet.parameters()) / 1e9, 3),
                      "latent_side": d["latent_side"], "lora_rank": options.rank, "batch": 1, "optimizer": "AdamW"}
    entry["configs"] = []
    generator = torch.Generator().manual_seed(4)
    side = d["latent_side"]
    latents = torch.randn(1, 4, side, side, generator=generator).to(device.device)
    states = torch.randn(1, 77, d["cross_attention_dim"], generator=generator).to(device.device, torch.bfloat16)
    added = {"text_embeds": torch.randn(1, d["text_embeds"], generator=generator).to(device.device, torch.bfloat16),
             "time_ids": torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]], device=device.device)}
    unet.train()
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)

        def step():
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (1,), device=device.device)
            with torch.autocast(device.device.type, dtype=torch.bfloat16):
                prediction = unet(latents + noise, timesteps, encoder_hidden_states=states,
                                  added_cond_kwargs=added).sample
            F.mse_loss(prediction.float(), noise).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        device.reset_peak()
        try:
            times = timed_steps(device, step, 1 + options.warmup + options.steps)
            result = {"gradient_checkpointing": checkpointing, "step_ms": median_ms(times[1 + options.warmup:]),
                      **device.peaks()}
        except torch.cuda.OutOfMemoryError as error:
            result = {"gradient_checkpointing": checkpointing, "error": f"out of memory: {error}"}
        entry["configs"].append(result)
        print(f"sdxl gradient checkpointing {'on ' if checkpointing else 'off'}: {result}", flush=True)
        report.write()
        del optimizer
        release_memory()


# ---- main -------------------------------------------------------------------------------------------

def exactness_cell(exact) -> str:
    if not exact:
        return "-"
    return f"{'yes' if exact['exact_to_bf16'] else 'NO'} (loss {exact['loss_rel_diff']:.1e}, grads {exact['grad_rel_diff']:.1e})"


def print_table(report: Report) -> None:
    sections = report.data["sections"]
    print("\n| section | precision | blocks_to_swap | step ms | peak allocated GiB | fits | exact vs no swap |")
    print("|---|---|---|---|---|---|---|")
    for config in sections.get("flux", {}).get("configs", []):
        exact = config.get("exactness_vs_no_swap")
        print(f"| flux | {config['precision']} | {config['blocks_to_swap']} | {config.get('step_ms', config.get('error', '')[:40])} "
              f"| {config.get('peak_allocated_gib')} | {', '.join(config.get('fits') or []) or '-'} | "
              f"{exactness_cell(exact)} |")
    baseline = sections.get("flux_baseline", {})
    if "step_ms" in baseline:
        print(f"| flux hand-written loop | bf16 | 0 | {baseline['step_ms']} | {baseline.get('peak_allocated_gib')} | | |")
    for config in sections.get("flux_full", {}).get("configs", []):
        print(f"| flux full fine-tune, fused Adafactor | bf16 | {config['blocks_to_swap']} | "
              f"{config.get('step_ms', config.get('error', '')[:40])} | {config.get('peak_allocated_gib')} | "
              f"{', '.join(config.get('fits') or []) or '-'} | |")
    for config in sections.get("sdxl", {}).get("configs", []):
        label = "sdxl, checkpointing " + ("on" if config["gradient_checkpointing"] else "off")
        print(f"| {label} | bf16 | - | {config.get('step_ms', config.get('error', '')[:40])} | "
              f"{config.get('peak_allocated_gib')} | {', '.join(config.get('fits') or []) or '-'} | |")
    for name, section in sections.items():
        if section.get("status") == "error":
            print(f"section {name} FAILED: {section['error']}")
    if not report.data["meta"]["cuda"]:
        print("\nNo CUDA: tiny widths on the CPU. Needs CUDA: " + "; ".join(NEEDS_CUDA))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json", help="where to write the figures (JSON)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths even on a GPU (automatic without CUDA)")
    parser.add_argument("--sections", nargs="+", default=["flux", "flux_baseline", "flux_full", "sdxl"],
                        choices=["flux", "flux_baseline", "flux_full", "sdxl"])
    parser.add_argument("--swaps", type=int, nargs="+", default=list(SWAPS),
                        help="--blocks_to_swap values (0 is the reference and is always run first)")
    parser.add_argument("--full_swaps", type=int, nargs="+", default=list(FULL_SWAPS),
                        help="--blocks_to_swap values of the full fine-tuning section")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first one")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--double", type=int, default=None, help="FLUX double blocks (default 19, FLUX.1's)")
    parser.add_argument("--single", type=int, default=None, help="FLUX single blocks (default 38, FLUX.1's)")
    parser.add_argument("--sdpa", nargs="+", default=None, choices=["flash", "efficient", "cudnn", "math"],
                        help="restrict torch's scaled_dot_product_attention to these backends (default: torch's choice)")
    parser.add_argument("--isolate", action="store_true", help="one process per section on the CPU too")
    parser.add_argument("--in_process", action="store_true",
                        help="run the sections in this process (default on CUDA: one process per section)")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one)")
    options = parser.parse_args(argv)
    options.swaps = [0] + sorted(set(options.swaps) - {0})
    return options


def attention_backends(options):
    """A context restricting scaled_dot_product_attention's backends (--sdpa), else a no-op."""
    from contextlib import nullcontext

    if not options.sdpa:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[n] for n in options.sdpa])


def main(argv=None) -> int:
    import logging
    import tempfile

    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cuda = torch.cuda.is_available()
    options.tiny = options.tiny or not cuda
    device = Device("cuda" if cuda else "cpu")
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cuda": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "tiny": options.tiny,
            "needs_cuda": [] if cuda else NEEDS_CUDA, "cards_gb": list(CARDS_GB), "sdpa_backends": options.sdpa,
            "fits_rule": f"peak reserved + {CUDA_CONTEXT_GIB} GiB CUDA context <= card size"}
    print(f"gpu_check: {meta['device']}, torch {meta['torch']}, {'tiny' if options.tiny else 'real'} dimensions",
          flush=True)
    report = Report(options.json, meta)
    report.write()
    isolate = (cuda or options.isolate) and not options.in_process
    passed_on = [a for i, a in enumerate(argv) if not _is_section_or_json(argv, i)]
    with tempfile.TemporaryDirectory() as scratch, attention_backends(options):
        options.work_dir = options.work_dir or scratch
        if "flux" in options.sections:
            if isolate:
                run_isolated(report, [n for n in options.sections if n.startswith("flux")], options, passed_on)
            else:
                run_section(report, "flux", flux_section, options, device)
        elif "flux_baseline" in options.sections:
            report.section("flux_baseline").update(status="skipped", reason="runs inside the flux section")
        for name, function in (("flux_full", flux_full_section), ("sdxl", sdxl_section)):
            if name in options.sections:
                if isolate:
                    run_isolated(report, [name], options, passed_on)
                else:
                    run_section(report, name, function, options, device)
    print_table(report)
    failed = [n for n, s in report.data["sections"].items() if s.get("status") == "error"]
    return 1 if failed else 0


def _is_section_or_json(argv: list, index: int) -> bool:
    """Whether argv[index] belongs to --sections or --json (the isolated child gets its own)."""
    for start in range(index, -1, -1):
        if argv[start].startswith("--"):
            return argv[start].split("=")[0] in ("--sections", "--json")
    return False


if __name__ == "__main__":
    sys.exit(main())
