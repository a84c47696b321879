"""The generic training loop, shared by every family and both training modes.

It wires the pieces together: dataset specs -> TrainDataset (+ validation split, latent and
text-encoder caches) -> per-batch loss (library/training/step_loss.py: the family's strategies,
noise scheme and denoiser call) -> optimizer -> periodic saves, resumable states, sample images
(sampling.py), validation loss (validation.py) and the EMA of the trained weights (ema.py). Several
processes split every global batch (distributed.py). It never branches on a family: everything model-specific comes from the family
object; everything mode-specific (LoRA or full weights) from the mode.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from contextlib import nullcontext

from library.atomic_io import ensure_writable_dir
from library.devices import move_module, torch_dtype
from library.errors import UserError
from library.training import checkpoints
from library.training.modes import make_mode
from library.training.state import TrainingPosition
from library.training.stop_signal import StopRequest

logger = logging.getLogger(__name__)


def disable_cudnn_attention(device) -> None:
    """Training attention runs on torch's flash / memory-efficient kernels, not cuDNN's: torch 2.11 prefers cuDNN
    attention on Hopper GPUs, and its backward fails at FLUX.1's real size (24 heads of 128, 4096 + 512 tokens:
    "mha_graph.execute(...).is_good()", then an illegal memory access; measured on an H200, 2026-12-04)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def trigger_word_for_samples(args, dataset) -> str | None:
    """--trigger_word, else the first subset that sets one."""
    if getattr(args, "trigger_word", None):
        return args.trigger_word
    words = [s.captions.trigger_word for d in dataset.datasets for s in d.subsets if s.captions.trigger_word]
    return words[0] if words else None


class Trainer:
    def __init__(self, family, args):
        """`family` configured for the run (parse_training_args returns it with `args`); its
        settings' kind picks the training mode."""
        self.family, self.args = family, args
        self.mode = make_mode(family.settings.kind, family, args)
        self.fused = None  # a FusedStep with --fused_backward_pass / --blockwise_fused_optimizers

    # ----- setup -------------------------------------------------------------------------------
    def _load_datasets(self, seed: int, num_processes: int):
        from library.config.dataset_config import load_dataset_group
        from library.training.validation import build_datasets

        from library.data.loss_masks import check_masked_loss

        args = self.args
        spec = load_dataset_group(args)
        check_masked_loss(spec, args.masked_loss)
        train, validation = build_datasets(spec, seed, args.prior_loss_weight, args.max_train_steps)
        train.num_processes = num_processes
        if validation is None and (args.validate_every_n_steps or args.validate_every_n_epochs):
            raise UserError("--validate_every_n_steps/--validate_every_n_epochs need validation images: set "
                            "validation_split (flag or dataset option) or a [[datasets]] with is_validation = true")
        for dataset in (train, validation):
            if dataset is not None and (args.cache_latents or args.cache_latents_to_disk):
                dataset.validate_for_latent_caching()
        return train, validation

    def _place_components(self, components, device, weight_dtype) -> None:
        """Frozen parts go to the training dtype; trainable parts stay fp32 unless --full_*."""
        import torch

        args = self.args
        trainable = {id(m) for m in self.mode.trainable_modules(components)}
        full_precision_dtype = weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32

        def dtype_of(part):
            return full_precision_dtype if id(part) in trainable else weight_dtype

        self.family.place_denoiser(components, device, dtype_of(components.denoiser))
        for index, part in enumerate(components.text_encoders):
            self.family.place_text_encoder(components, index, device, dtype_of(part))
        if components.vae is not None:
            move_module(components.vae, device, torch.float32 if getattr(args, "no_half_vae", False) else weight_dtype)

    def _cache_latents(self, dataset, strategy, components, accelerator) -> None:
        args = self.args
        if not (args.cache_latents or args.cache_latents_to_disk) or components.vae is None:
            return  # without a VAE, _needs_vae already pointed every entry at its cache file
        from library.data.latent_cache import cache_dataset_latents

        components.vae.eval()
        with accelerator.main_process_first():  # the others then reuse the main process's cache files
            counts = cache_dataset_latents(
                dataset, strategy, components.vae, to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                device=accelerator.device, dtype=next(components.vae.parameters()).dtype,
                skip_cache_check=args.skip_cache_check, cache_dir=args.latents_cache_dir,
            )
        logger.info("latent cache: %d encoded, %d reused", counts.encoded, counts.reused)

    def _needs_vae(self, strategy, datasets) -> bool:
        """False only when nothing will encode or decode images: every latent of every dataset is in a
        valid cache file (the entries then point at them), no samples are drawn and no full model
        (which includes the VAE) is saved."""
        from library.data.latent_cache import use_existing_cache_files

        args = self.args
        if not args.cache_latents_to_disk or getattr(args, "sample_prompts", None) or self.mode.kind.is_full_fine_tune:
            return True
        return not all(
            use_existing_cache_files(part, strategy, cache_dir=args.latents_cache_dir, skip_cache_check=args.skip_cache_check)
            for part in datasets if part is not None
        )

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
        from library.training.attention import apply_attention_backend
        from library.training.distributed import build_accelerator
        from library.training.ema import EMATracker
        from library.training.initial_step import initial_position
        from library.training.fused_backward import fused_step_for
        from library.training.lr_schedulers import build_lr_scheduler
        from library.training.metadata import training_metadata
        from library.training.optimizers import build_optimizer, describe_optimizer, set_optimizer_train_mode
        from library.training.state import load_training_state, resolve_resume_folder
        from library.training.step_loss import TrainableModules
        from library.training.step_rng import seed_everything

        args = self.args
        ensure_writable_dir(args.output_dir)
        started_at = time.time()
        resume_folder = resolve_resume_folder(args.resume, args.output_dir, args.output_name) if args.resume else None
        seed = self._choose_seed(resume_folder)
        seed_everything(seed)  # network initialisation, before any state is loaded, is then reproducible

        accelerator = build_accelerator(args)
        disable_cudnn_attention(accelerator.device)
        dataset, validation_dataset = self._load_datasets(seed, accelerator.num_processes)
        num_batches, steps_per_epoch, max_steps = self._step_counts(dataset)
        num_epochs = math.ceil(max_steps / steps_per_epoch)
        dataset.max_train_steps = max_steps

        latents_strategy = self.family.latents_caching_strategy(args)
        needs_vae = self._needs_vae(latents_strategy, (dataset, validation_dataset))
        if not needs_vae:
            logger.info("all latents cached: the VAE is not loaded")
        components = self.family.load(args, with_vae=needs_vae)
        apply_attention_backend(args, components.denoiser, accelerator.device)
        weight_dtype = torch_dtype(args.mixed_precision)
        param_groups = self.mode.prepare(components)
        self.fused = fused_step_for(args)
        if self.fused:
            param_groups = self.fused.param_groups(param_groups, self.family, components)
        self._place_components(components, accelerator.device, weight_dtype)
        for part in (dataset, validation_dataset):
            if part is not None:
                self._cache_latents(part, latents_strategy, components, accelerator)
                self._cache_text_encoder_outputs(part, components, accelerator.device)
        if args.gradient_checkpointing or args.cpu_offload_checkpointing:
            self._enable_gradient_checkpointing(components)

        optimizer = build_optimizer(args, param_groups)
        if self.fused:
            self.fused.attach(optimizer, accelerator.num_processes)
        lr_scheduler = build_lr_scheduler(args, optimizer, max_steps)
        trainable = self.mode.trainable_modules(components)
        # a full fine-tune's trainable modules are placed already (a network is not): moving them again would
        # pull the weights of swapped blocks (--blocks_to_swap) onto the device
        placed = self.mode.kind.is_full_fine_tune
        wrapper, optimizer, lr_scheduler = accelerator.prepare(TrainableModules(trainable), optimizer, lr_scheduler,
                                                               device_placement=[not placed, True, True])

        ema = EMATracker.for_run(args, trainable, accelerator)  # before a resume, which restores it
        position = TrainingPosition(global_step=0, epoch=1, batch_index=0, seed=seed)
        if resume_folder:
            position = load_training_state(accelerator, resume_folder)
        position = initial_position(args, position, steps_per_epoch, num_batches, max_steps)

        metadata = training_metadata(args, self.family, components, dataset, describe_optimizer(args, optimizer),
                                     num_batches_per_epoch=num_batches, num_epochs=num_epochs,
                                     max_train_steps=max_steps, seed=seed, started_at=started_at)
        self.run = _Run(self, accelerator, components, dataset, validation_dataset, optimizer, lr_scheduler, wrapper,
                        weight_dtype, latents_strategy, max_steps, steps_per_epoch, num_batches, metadata, ema)
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
        from library.training.fused_backward import checkpointing_function

        components.denoiser.enable_gradient_checkpointing(checkpointing_function(self.args))
        components.denoiser.train()
        if self.mode.trains_text_encoder:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable()
                encoder.train()


class _Run:
    """The state of one training run in progress (kept apart from setup to keep both short)."""

    def __init__(self, trainer, accelerator, components, dataset, validation_dataset, optimizer, lr_scheduler, wrapper,
                 weight_dtype, latents_strategy, max_steps, steps_per_epoch, num_batches, metadata, ema):
        from library.training.sampling import Sampler
        from library.training.step_loss import NonFiniteGuard, StepLoss
        from library.training.validation import Validator

        self.trainer, self.args, self.family, self.mode = trainer, trainer.args, trainer.family, trainer.mode
        self.fused = trainer.fused  # the optimizer step runs inside backward (library/training/fused_backward.py)
        self.accelerator, self.components, self.dataset = accelerator, components, dataset
        self.optimizer, self.lr_scheduler, self.wrapper = optimizer, lr_scheduler, wrapper
        self.max_steps, self.steps_per_epoch, self.num_batches = max_steps, steps_per_epoch, num_batches
        self.metadata, self.ema = metadata, ema
        self.seed = int(metadata["ss_seed"])
        self.trainable = self.mode.trainable_modules(components)
        self.step_loss = StepLoss(self.family, components, self.args, accelerator, latents_strategy, weight_dtype,
                                  self.mode.trains_text_encoder)
        self.schedule = checkpoints.SaveSchedule.from_args(self.args)
        self.save_dtype = torch_dtype(self.args.save_precision or "float")
        self.sampler = Sampler(self.family, self.args, components, accelerator, self.trainable,
                               trigger_word_for_samples(self.args, dataset), self.seed)
        self.validator = None if validation_dataset is None else Validator(
            validation_dataset, self.step_loss, accelerator, self.args, self.seed, self.trainable, max_steps)
        self.guard = NonFiniteGuard(self.args.max_nonfinite_steps)
        self.window_losses: list[float] = []
        self.saved: list[str] = []
        self.stop: StopRequest | None = None
        self.stopped = False  # a stop signal ended the loop before max_steps

    def loop(self, position: TrainingPosition, num_epochs: int) -> None:
        from tqdm.auto import tqdm

        from library.training.trackers import start_trackers

        args = self.args
        progress = tqdm(total=self.max_steps, initial=position.global_step, desc="steps",
                        disable=not self.accelerator.is_local_main_process)
        logger.info("training %d steps: %d epochs of %d batches (gradient accumulation %d, %d processes)",
                    self.max_steps, num_epochs, self.num_batches, args.gradient_accumulation_steps,
                    self.accelerator.num_processes)
        start_trackers(self.accelerator, args)
        with StopRequest() as self.stop:
            if self.sampler.due_at_first(position.global_step):
                self._sample(0, epoch=0)
            while position.global_step < self.max_steps and position.epoch <= num_epochs and not self.stopped:
                epoch = position.epoch
                position = self._run_epoch(position, progress)
                if position.epoch > epoch or not self.stopped:
                    self._after_epoch(epoch, position)
            progress.close()
            if self.stopped:
                self._save_on_stop(position)
            else:
                self._save(args.output_name, position, is_final=True)
        self.accelerator.end_training()

    def _run_epoch(self, position: TrainingPosition, progress) -> TrainingPosition:
        """Runs the rest of `position.epoch`; returns the position after its last optimizer step."""
        from library.data.dataset import EpochLoader
        from library.training.distributed import mean_over_processes, rank_shares

        accum, epoch = self.args.gradient_accumulation_steps, position.epoch
        first_step = (epoch - 1) * self.steps_per_epoch
        shares = rank_shares(self.dataset.batches_for_epoch(epoch), self.accelerator.process_index,
                             self.accelerator.num_processes)
        loader = EpochLoader(self.dataset, epoch, start_batch=position.batch_index, batches=[s.refs for s in shares],
                             global_step_of_batch=lambda i: first_step + i // accum)
        micro_losses = []
        for batch_index, batch in enumerate(self._dataloader(loader), start=position.batch_index):
            group_end = min((batch_index // accum + 1) * accum, self.num_batches)
            group_size = group_end - (batch_index // accum) * accum
            sync = batch_index + 1 == group_end
            micro_losses.append(self._micro_step(batch, shares[batch_index], epoch, batch_index, group_size, sync))
            if not sync:
                continue
            step = position.global_step + 1
            ends_epoch = group_end == self.num_batches
            position = TrainingPosition(step, epoch + 1 if ends_epoch else epoch, 0 if ends_epoch else group_end,
                                        position.seed)
            loss = mean_over_processes(self.accelerator, sum(micro_losses))
            micro_losses = []
            finite = self._optimizer_step(loss)
            if finite:
                self.ema.update(step)
            self._log_step(progress, step, loss)
            self.guard.record(step, finite, self._kept_saves())
            self._after_step(step, position)
            if step >= self.max_steps:
                break
            if self.stop.should_stop(self.accelerator):
                self.stopped = True
                break
        return position

    def _dataloader(self, loader):
        from torch.utils.data import DataLoader

        workers = self.args.max_data_loader_n_workers
        return DataLoader(loader, batch_size=None, num_workers=workers, persistent_workers=False)

    def _micro_step(self, batch: dict, share, epoch: int, batch_index: int, group_size: int, sync: bool) -> float:
        from library.training.distributed import sample_generators
        from library.training.step_rng import batch_generator

        accelerator = self.accelerator
        # reseeds the global RNGs (LoRA dropout) for this micro-batch; noise has per-sample generators
        batch_generator(self.seed, epoch, batch_index, accelerator.process_index, accelerator.device)
        generators = sample_generators(self.seed, epoch, batch["sample_keys"], accelerator.device)
        with nullcontext() if sync else accelerator.no_sync(self.wrapper):
            losses = self.step_loss.sample_losses(batch, generators, forward=self.wrapper)
            loss = losses.sum() * share.loss_scale(accelerator.num_processes)
            value = loss.detach().item()  # one device sync per micro-batch, before backward (the fused step needs it)
            if self.fused:
                self.fused.arm(value)
            accelerator.backward(loss / group_size)
        return value / group_size

    def _optimizer_step(self, loss: float) -> bool:
        """Steps the optimizer unless the loss (the same on every process) is NaN/inf; False then.
        A fused step already ran inside backward (and not for a NaN loss); here it only finishes."""
        finite = math.isfinite(loss)
        if self.fused:
            self.fused.finish()
        elif finite:
            if self.args.max_grad_norm:
                params = [p for module in self.trainable for p in module.parameters() if p.requires_grad]
                self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
            self.optimizer.step()
        with warnings.catch_warnings():  # torch warns when the scheduler steps without the optimizer
            if not finite:
                warnings.simplefilter("ignore")
            self.lr_scheduler.step()  # the schedule follows the step count, skipped steps included
        self.optimizer.zero_grad(set_to_none=True)
        return finite

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

    def _after_step(self, step: int, position: TrainingPosition) -> None:
        if self.schedule.saves_at_step(step) and step < self.max_steps and not self.guard.in_streak:
            name = self.args.output_name
            old_file, old_state = self.schedule.step_to_prune(step), self.schedule.step_to_prune(step, state=True)
            self._save(checkpoints.step_stem(name, step), position,
                       checkpoints.step_stem(name, old_file) if old_file else None,
                       checkpoints.step_stem(name, old_state) if old_state else None)
        if self.sampler.due_at_step(step):
            self._sample(step)
        if self.validator and self.validator.due_at_step(step):
            self.validator.run(step)

    def _after_epoch(self, epoch: int, position: TrainingPosition) -> None:
        """After an epoch's last step, or after the last step of training inside an epoch."""
        step = position.global_step
        if position.epoch > epoch and self.schedule.saves_at_epoch(epoch) and step < self.max_steps \
                and not self.guard.in_streak:
            name = self.args.output_name
            old_file, old_state = self.schedule.epoch_to_prune(epoch), self.schedule.epoch_to_prune(epoch, state=True)
            self._save(checkpoints.epoch_stem(name, epoch), position,
                       checkpoints.epoch_stem(name, old_file) if old_file else None,
                       checkpoints.epoch_stem(name, old_state) if old_state else None)
        if self.sampler.due_at_epoch(epoch):
            self._sample(step, epoch=epoch)
        if self.validator and self.validator.due_at_epoch(epoch, step):
            self.validator.run(step)

    def _sample(self, step: int, epoch: int | None = None) -> None:
        with self.ema.sampling():  # the EMA weights with --sample_with_ema
            self.sampler.sample(step, epoch=epoch)

    # ----- saving ------------------------------------------------------------------------------
    def _kept_saves(self) -> str:
        if not self.saved:
            return "nothing was saved yet, so no file was written"
        return f"the last saves ({', '.join(self.saved[-2:])}) are kept unchanged"

    def _save_on_stop(self, position: TrainingPosition) -> None:
        stem = checkpoints.step_stem(self.args.output_name, position.global_step)
        self._save(stem, position, with_state=True)
        logger.warning("stopped by %s at step %d/%d: saved %s and %s; continue with --resume latest",
                       self.stop.signal_name or "another process", position.global_step, self.max_steps,
                       stem + self.mode.save_extension, checkpoints.state_dir_name(stem))

    def _save(self, stem: str, position: TrainingPosition, prune_file: str | None = None,
              prune_state: str | None = None, is_final: bool = False, with_state: bool = False) -> None:
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
            written = self.ema.save(lambda target, meta: self.mode.save(self.components, target, self.save_dtype, meta),
                                    path, metadata)  # the raw weights and, with --ema, the EMA ones
            logger.info("saved %s", ", ".join(written))
            self.saved += [os.path.basename(p) for p in written]
            set_optimizer_train_mode(self.optimizer, True)
            if prune_file:
                for stem in (prune_file, f"{prune_file}-ema"):
                    checkpoints.remove_saved_file(args.output_dir, stem, self.mode.save_extension)
        if with_state or args.save_state or (is_final and args.save_state_on_train_end):
            folder = checkpoints.state_dir_name(stem)
            save_training_state(accelerator, os.path.join(args.output_dir, folder), position)
            self.saved.append(folder)
            if prune_state and accelerator.is_main_process:
                checkpoints.remove_saved_state(args.output_dir, prune_state)

    def _architecture(self) -> str:
        return self.family.modelspec_architecture(self.components) + self.mode.architecture_suffix
