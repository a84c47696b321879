"""The generic training loop, shared by every family and both training modes.

It wires the pieces together: dataset specs -> TrainDataset (+ latent cache) -> the family's
tokenize/encode strategies -> the family's noise scheme and denoiser call -> loss -> optimizer ->
periodic saves and resumable states. It never branches on a family: everything model-specific
comes from the family object; everything mode-specific (LoRA or full weights) from the mode.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext

from library.atomic_io import ensure_writable_dir
from library.errors import UserError
from library.training import checkpoints
from library.training.modes import make_mode
from library.training.state import TrainingPosition

logger = logging.getLogger(__name__)

DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16", "float": "float32"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def move_tokens(tokens: list[dict], device) -> list[dict]:
    return [{k: v.to(device) for k, v in part.items()} for part in tokens]


def move_module(module, device, dtype) -> None:
    """Move to device, and cast only when the dtype really changes (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


class Trainer:
    def __init__(self, family, mode_name: str, args):
        self.family, self.args = family, args
        self.mode = make_mode(mode_name, family, args)

    # ----- setup -------------------------------------------------------------------------------
    def _build_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        args = self.args
        log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
        project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.logging_dir)
        return Accelerator(mixed_precision=args.mixed_precision, log_with=log_with, project_config=project)

    def _load_dataset(self, seed: int):
        from library.config.dataset_config import load_dataset_group
        from library.data.dataset import TrainDataset

        spec = load_dataset_group(self.args)
        return TrainDataset.from_spec(spec, seed=seed, prior_loss_weight=self.args.prior_loss_weight,
                                      max_train_steps=self.args.max_train_steps)

    def _place_components(self, components, device, weight_dtype) -> None:
        """Frozen parts go to the training dtype; trainable parts stay fp32 unless --full_*."""
        import torch

        args = self.args
        trainable = {id(m) for m in self.mode.trainable_modules(components)}
        full_precision_dtype = weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32
        def dtype_of(part):
            return full_precision_dtype if id(part) in trainable else weight_dtype

        self.family.place_denoiser(components, device, dtype_of(components.denoiser), args)
        for part in components.text_encoders:
            move_module(part, device, dtype_of(part))
        if components.vae is not None:
            move_module(components.vae, device, torch.float32 if getattr(args, "no_half_vae", False) else weight_dtype)

    def _cache_latents(self, dataset, strategy, components, device) -> bool:
        args = self.args
        if not (args.cache_latents or args.cache_latents_to_disk):
            return False
        from library.data.latent_cache import cache_dataset_latents

        components.vae.eval()
        counts = cache_dataset_latents(
            dataset, strategy, components.vae, to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
            device=device, dtype=next(components.vae.parameters()).dtype, skip_cache_check=args.skip_cache_check,
            cache_dir=args.latents_cache_dir,
        )
        logger.info("latent cache: %d encoded, %d reused", counts.encoded, counts.reused)
        return True

    def _cache_text_encoder_outputs(self, dataset, components, device) -> None:
        args = self.args
        if not (getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk", False)):
            return
        from library.data.text_encoder_cache import cache_dataset_text_encoder_outputs

        cache_dataset_text_encoder_outputs(dataset, self.family, args, components, device)

    def _step_counts(self, dataset) -> tuple[int, int, int]:
        args = self.args
        num_batches = dataset.num_batches_per_epoch()
        steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
        max_steps = args.max_train_steps
        if args.max_train_epochs:
            max_steps = args.max_train_epochs * steps_per_epoch
        return num_batches, steps_per_epoch, max_steps

    # ----- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        import torch

        from library.training.lr_schedulers import build_lr_scheduler
        from library.training.metadata import training_metadata
        from library.training.optimizers import build_optimizer, describe_optimizer, set_optimizer_train_mode
        from library.training.state import load_training_state, resolve_resume_folder

        args = self.args
        ensure_writable_dir(args.output_dir)
        started_at = time.time()
        resume_folder = resolve_resume_folder(args.resume, args.output_dir, args.output_name) if args.resume else None
        seed = self._choose_seed(resume_folder)

        accelerator = self._build_accelerator()
        dataset = self._load_dataset(seed)
        if args.cache_latents or args.cache_latents_to_disk:
            dataset.validate_for_latent_caching()
        num_batches, steps_per_epoch, max_steps = self._step_counts(dataset)
        num_epochs = math.ceil(max_steps / steps_per_epoch)
        dataset.max_train_steps = max_steps

        components = self.family.load(args)
        weight_dtype = torch_dtype(args.mixed_precision)
        device = accelerator.device
        param_groups = self.mode.prepare(components)
        self._place_components(components, device, weight_dtype)
        latents_strategy = self.family.latents_caching_strategy(args)
        latents_cached = self._cache_latents(dataset, latents_strategy, components, device)
        self._cache_text_encoder_outputs(dataset, components, device)
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing(components)

        optimizer = build_optimizer(args, param_groups)
        # accelerate steps a prepared scheduler once per process per optimizer step
        lr_scheduler = build_lr_scheduler(args, optimizer, max_steps * accelerator.num_processes)
        trainable = self.mode.trainable_modules(components)
        prepared = accelerator.prepare(*trainable, optimizer, lr_scheduler)
        self.mode.replace_prepared(list(prepared[: len(trainable)]))
        optimizer, lr_scheduler = prepared[len(trainable)], prepared[len(trainable) + 1]

        position = TrainingPosition(global_step=0, epoch=1, batch_index=0, seed=seed)
        if resume_folder:
            position = load_training_state(accelerator, resume_folder)

        self.run = _Run(self, accelerator, components, dataset, optimizer, lr_scheduler, weight_dtype,
                        latents_strategy, latents_cached, max_steps, steps_per_epoch, num_batches,
                        training_metadata(args, self.family, dataset, describe_optimizer(args, optimizer),
                                          num_batches_per_epoch=num_batches,
                                          num_epochs=num_epochs, max_train_steps=max_steps, seed=seed,
                                          started_at=started_at))
        set_optimizer_train_mode(optimizer, True)
        self.run.loop(position, num_epochs)

    def _choose_seed(self, resume_folder) -> int:
        from library.training.state import read_position

        if resume_folder:
            saved = read_position(resume_folder).seed
            if self.args.seed is not None and self.args.seed != saved:
                logger.warning("--seed %d differs from the resumed run's seed %d; using %d so resume is exact",
                               self.args.seed, saved, saved)
            return saved
        return self.args.seed if self.args.seed is not None else random.randint(0, 2**31 - 1)

    def _enable_gradient_checkpointing(self, components) -> None:
        components.denoiser.enable_gradient_checkpointing()
        components.denoiser.train()
        if self.mode.trains_text_encoder:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable()
                encoder.train()


class _Run:
    """The state of one training run in progress (kept apart from setup to keep both short)."""

    def __init__(self, trainer, accelerator, components, dataset, optimizer, lr_scheduler, weight_dtype,
                 latents_strategy, latents_cached, max_steps, steps_per_epoch, num_batches, metadata):
        self.trainer, self.args, self.family, self.mode = trainer, trainer.args, trainer.family, trainer.mode
        self.accelerator, self.components, self.dataset = accelerator, components, dataset
        self.optimizer, self.lr_scheduler, self.weight_dtype = optimizer, lr_scheduler, weight_dtype
        self.latents_strategy, self.latents_cached = latents_strategy, latents_cached
        self.max_steps, self.steps_per_epoch, self.num_batches = max_steps, steps_per_epoch, num_batches
        self.metadata = metadata
        self.tokenize = self.family.tokenize_strategy(self.args, components)
        self.encode_text = self.family.text_encoding_strategy(self.args)
        self.noise = self.family.noise_scheme(self.args, components)
        self.schedule = checkpoints.SaveSchedule(self.args.save_every_n_steps, self.args.save_every_n_epochs,
                                                 self.args.save_last_n_steps, self.args.save_last_n_epochs)
        self.save_dtype = torch_dtype(self.args.save_precision or "float")
        self.window_losses: list[float] = []

    def loop(self, position: TrainingPosition, num_epochs: int) -> None:
        from tqdm.auto import tqdm

        args = self.args
        progress = tqdm(total=self.max_steps, initial=position.global_step, desc="steps",
                        disable=not self.accelerator.is_local_main_process)
        logger.info("training %d steps: %d epochs of %d batches (gradient accumulation %d)",
                    self.max_steps, num_epochs, self.num_batches, args.gradient_accumulation_steps)
        self.accelerator.init_trackers(args.log_prefix or "train", config={})
        while position.global_step < self.max_steps and position.epoch <= num_epochs:
            epoch = position.epoch
            position = self._run_epoch(position, progress)
            if position.epoch > epoch and self.schedule.saves_at_epoch(epoch) and position.global_step < self.max_steps:
                self._save(checkpoints.epoch_stem(args.output_name, epoch), position,
                           prune_stem=self._pruned_epoch_stem(epoch))
        progress.close()
        self._save(args.output_name, position, prune_stem=None, is_final=True)
        self.accelerator.end_training()

    def _run_epoch(self, position: TrainingPosition, progress) -> TrainingPosition:
        """Runs the rest of `position.epoch`; returns the position after its last optimizer step."""
        from library.data.dataset import EpochLoader

        accum, epoch = self.args.gradient_accumulation_steps, position.epoch
        first_step = (epoch - 1) * self.steps_per_epoch
        loader = EpochLoader(self.dataset, epoch, start_batch=position.batch_index,
                             global_step_of_batch=lambda i: first_step + i // accum)
        micro_losses, start = [], position.batch_index
        for batch_index, batch in enumerate(self._dataloader(loader), start=start):
            group_end = min((batch_index // accum + 1) * accum, self.num_batches)
            group_size = group_end - (batch_index // accum) * accum
            micro_losses.append(self._micro_step(batch, epoch, batch_index, group_size, sync=batch_index + 1 == group_end))
            if batch_index + 1 < group_end:
                continue
            step = position.global_step + 1
            ends_epoch = group_end == self.num_batches
            position = TrainingPosition(step, epoch + 1 if ends_epoch else epoch, 0 if ends_epoch else group_end,
                                        position.seed)
            self._log_step(progress, step, sum(micro_losses))
            micro_losses = []
            if self.schedule.saves_at_step(step) and step < self.max_steps:
                self._save(checkpoints.step_stem(self.args.output_name, step), position,
                           prune_stem=self._pruned_step_stem(step))
            if step >= self.max_steps:
                break
        return position

    def _dataloader(self, loader):
        from torch.utils.data import DataLoader

        workers = self.args.max_data_loader_n_workers
        return DataLoader(loader, batch_size=None, num_workers=workers, persistent_workers=False)

    def _micro_step(self, batch: dict, epoch: int, batch_index: int, group_size: int, sync: bool) -> float:
        from library.training.step_rng import batch_generator

        accelerator = self.accelerator
        generator = batch_generator(self.args_seed, epoch, batch_index, accelerator.process_index, accelerator.device)
        trainable = self.mode.trainable_modules(self.components)
        no_sync = nullcontext() if sync else accelerator.no_sync(trainable[0])
        with no_sync:
            loss = self._loss(batch, generator)
            accelerator.backward(loss / group_size)
        if sync:
            self._optimizer_step(trainable)
        return loss.detach().item() / group_size

    @property
    def args_seed(self) -> int:
        return int(self.metadata["ss_seed"])

    def _latents(self, batch: dict):
        import torch

        device = self.accelerator.device
        if "latents" in batch:
            return batch["latents"].to(device, dtype=torch.float32)
        vae = self.components.vae
        with torch.no_grad():
            images = batch["images"].to(device, dtype=next(vae.parameters()).dtype)
            return self.latents_strategy.encode(vae, images).to(torch.float32)

    def _conditioning(self, batch: dict) -> dict:
        import torch

        if "conditioning" in batch:  # cached text-encoder outputs
            return {k: v.to(self.accelerator.device) for k, v in batch["conditioning"].items()}
        tokens = move_tokens(self.tokenize.tokenize(batch["captions"]), self.accelerator.device)
        with torch.set_grad_enabled(self.mode.trains_text_encoder):
            return self.encode_text.encode(self.components.text_encoders, tokens)

    def _loss(self, batch: dict, generator):
        from library.training.losses import per_sample_loss

        latents = self._latents(batch)
        conditioning = self._conditioning(batch)
        noise = self.noise.sample_noise(latents, generator)
        timesteps = self.noise.sample_timesteps(latents.shape[0], latents.device, generator)
        noisy = self.noise.add_noise(latents, noise, timesteps, generator)
        with self.accelerator.autocast():
            prediction = self.family.predict(self.components, noisy.to(self.weight_dtype),
                                             self.noise.model_timesteps(timesteps), conditioning, batch)
        target = self.noise.target(latents, noise, timesteps)
        mask = batch.get("alpha_masks")
        if mask is not None:
            mask = mask.to(latents.device)
        losses = per_sample_loss(prediction.float(), target.float(), self.args.loss_type,
                                 self.noise.huber_c(timesteps), mask)
        weights = self.noise.loss_weights(timesteps) * batch["loss_weights"].to(latents.device)
        return (losses * weights).mean()

    def _optimizer_step(self, trainable) -> None:
        if self.args.max_grad_norm:
            params = [p for module in trainable for p in module.parameters() if p.requires_grad]
            self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_step(self, progress, global_step: int, loss: float) -> None:
        lr = self.lr_scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.accelerator.log({"loss": loss, "lr": lr}, step=global_step)
        self.window_losses.append(loss)
        every = self.args.loss_log_every or max(1, self.max_steps // 10)
        if global_step % every == 0 or global_step == self.max_steps:
            mean = sum(self.window_losses) / len(self.window_losses)
            logger.info("step %d/%d: mean loss %.5f over the last %d steps, lr %.2e",
                        global_step, self.max_steps, mean, len(self.window_losses), lr)
            self.window_losses = []

    # ----- saving ------------------------------------------------------------------------------
    def _pruned_step_stem(self, step: int) -> str | None:
        old = self.schedule.step_to_prune(step)
        return checkpoints.step_stem(self.args.output_name, old) if old else None

    def _pruned_epoch_stem(self, epoch: int) -> str | None:
        old = self.schedule.epoch_to_prune(epoch)
        return checkpoints.epoch_stem(self.args.output_name, old) if old else None

    def _save(self, stem: str, position: TrainingPosition, prune_stem: str | None, is_final: bool = False) -> None:
        import os

        from library.training.metadata import save_time_metadata
        from library.training.optimizers import set_optimizer_train_mode
        from library.training.state import save_training_state

        args, accelerator = self.args, self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            set_optimizer_train_mode(self.optimizer, False)
            path = os.path.join(args.output_dir, stem + self.mode.save_extension)
            metadata = save_time_metadata(self.metadata, step=position.global_step,
                                          epoch=position.epoch - (1 if position.batch_index == 0 else 0),
                                          architecture=self._architecture())
            self.mode.save(self.components, path, self.save_dtype, metadata)
            logger.info("saved %s", path)
            set_optimizer_train_mode(self.optimizer, True)
            if prune_stem:
                checkpoints.remove_saved(args.output_dir, prune_stem, self.mode.save_extension)
        if args.save_state or (is_final and args.save_state_on_train_end):
            save_training_state(accelerator, os.path.join(args.output_dir, checkpoints.state_dir_name(stem)), position)

    def _architecture(self) -> str:
        suffix = "/lora" if self.mode.save_extension == ".safetensors" and hasattr(self.mode, "network") else ""
        return self.family.modelspec_architecture + suffix
