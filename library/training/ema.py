"""EMA (exponential moving average) of the trained weights, for LoRA and full fine-tuning alike.

The average itself is diffusers' `EMAModel` (diffusers.training_utils, maintained, used by the
diffusers training examples): after every `--ema_update_every`-th optimizer step the shadow weights
move to `shadow - (1 - d) * (shadow - weight)`, where the decay `d` of the n-th update is 0 for the
first `--ema_update_after_step` + 1 updates (the shadow copies the weights) and then, counting
k = n - update_after_step - 1, `min(--ema_decay, w(k))` with the warm-up `w` chosen by
`--ema_warmup`: `none` (w = 1: the decay is fixed), `ratio` (diffusers' default, (1 + k) / (10 + k))
or `power` ((1 - (1 + k / --ema_inv_gamma) ** -(--ema_power)), @crowsonkb's warm-up).

`EMATracker` is the one object the trainer talks to: `update` after an optimizer step, `save`
instead of the mode's own save (the raw weights plus `<name>-ema.safetensors`, or a `-ema` diffusers
folder, or only the EMA weights with `--ema_save_only`), `applied()` to sample images with the EMA
weights (`--sample_with_ema`), and accelerate save/load hooks that put the shadow weights and the
update count into every resumable state folder (`ema.safetensors`), so `--resume` continues exactly.
Its disabled form (no `--ema`) does nothing, so the trainer never branches on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from contextlib import contextmanager, nullcontext

from library.errors import UserError

logger = logging.getLogger(__name__)

EMA_STATE_FILE = "ema.safetensors"
WARMUPS = ("none", "ratio", "power")
EMA_FLAGS = ("ema_decay", "ema_update_after_step", "ema_update_every", "ema_warmup", "ema_power", "ema_inv_gamma",
             "ema_save_only", "sample_with_ema")


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("EMA of the trained weights")
    group.add_argument("--ema", action="store_true",
                       help="keep an exponential moving average of the trained weights and save it as <name>-ema")
    group.add_argument("--ema_decay", type=float, default=None, help="EMA decay (default 0.999)")
    group.add_argument("--ema_update_after_step", type=int, default=None, metavar="N",
                       help="the first N EMA updates copy the weights; averaging starts after them (default 0)")
    group.add_argument("--ema_update_every", type=int, default=None, metavar="N",
                       help="update the EMA every N optimizer steps (default 1)")
    group.add_argument("--ema_warmup", choices=WARMUPS, default=None,
                       help="decay warm-up: none (fixed decay), ratio ((1+k)/(10+k), the default) or power")
    group.add_argument("--ema_power", type=float, default=None, help="power of --ema_warmup power (default 2/3)")
    group.add_argument("--ema_inv_gamma", type=float, default=None,
                       help="inverse gamma of --ema_warmup power (default 1)")
    group.add_argument("--ema_save_only", action="store_true",
                       help="write the EMA weights instead of the raw ones (no -ema file alongside)")
    group.add_argument("--sample_with_ema", action="store_true", help="render sample images with the EMA weights")


def validate_ema_args(args: argparse.Namespace) -> None:
    """Every EMA flag needs --ema; values must make sense."""
    given = [flag for flag in EMA_FLAGS if getattr(args, flag) not in (None, False)]
    if given and not args.ema:
        raise UserError(f"--{given[0]} needs --ema")
    if not args.ema:
        return
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise UserError(f"--ema_decay must be between 0 and 1 (got {args.ema_decay}); e.g. 0.999")
    if args.ema_update_every is not None and args.ema_update_every < 1:
        raise UserError(f"--ema_update_every must be at least 1 (got {args.ema_update_every})")
    if args.ema_update_after_step is not None and args.ema_update_after_step < 0:
        raise UserError(f"--ema_update_after_step must not be negative (got {args.ema_update_after_step})")
    if (args.ema_power is not None or args.ema_inv_gamma is not None) and args.ema_warmup != "power":
        raise UserError("--ema_power/--ema_inv_gamma shape --ema_warmup power; add it or drop them")
    for flag in ("ema_power", "ema_inv_gamma"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} must be positive (got {value})")
    if args.sample_with_ema and not args.sample_prompts:
        raise UserError("--sample_with_ema needs --sample_prompts")


def ema_path(path: str) -> str:
    """`out.safetensors` -> `out-ema.safetensors`; a diffusers folder `out` -> `out-ema`."""
    stem, extension = os.path.splitext(path) if path.endswith(".safetensors") else (path, "")
    return f"{stem}-ema{extension}"


def make_ema_model(parameters, decay: float, update_after_step: int = 0, warmup: str = "ratio",
                   power: float = 2 / 3, inv_gamma: float = 1.0):
    """diffusers' EMAModel with our warm-up names (none = a fixed decay: min_decay = decay)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=decay, min_decay=decay if warmup == "none" else 0.0,
                    update_after_step=update_after_step, use_ema_warmup=warmup == "power",
                    inv_gamma=inv_gamma, power=power)


class EMATracker:
    """The EMA of one run's trainable parameters (disabled: every method does nothing)."""

    def __init__(self, args: argparse.Namespace | None = None, parameters=None):
        self.enabled = bool(args is not None and args.ema)
        self.parameters = list(parameters or []) if self.enabled else []
        self.every = (args.ema_update_every or 1) if self.enabled else 1
        self.save_only = bool(self.enabled and args.ema_save_only)
        self.for_samples = bool(self.enabled and args.sample_with_ema)
        self.decay = (args.ema_decay if args.ema_decay is not None else 0.999) if self.enabled else None
        self.model = None
        self.is_main_process = True  # only the main process writes the EMA into state folders
        if self.enabled:
            self.model = make_ema_model(
                self.parameters, self.decay, args.ema_update_after_step or 0, args.ema_warmup or "ratio",
                args.ema_power if args.ema_power is not None else 2 / 3,
                args.ema_inv_gamma if args.ema_inv_gamma is not None else 1.0)
            logger.info("EMA of %d tensors, decay %g, every %d steps", len(self.parameters), self.decay, self.every)

    @classmethod
    def for_run(cls, args, trainable_modules, accelerator) -> "EMATracker":
        """The run's tracker over the parameters that train, hooked into accelerate's state save/load."""
        if not args.ema:
            return cls()
        parameters = [p for module in trainable_modules for p in module.parameters() if p.requires_grad]
        tracker = cls(args, parameters)
        tracker.is_main_process = accelerator.is_main_process
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: tracker.save_state(folder))
        accelerator.register_load_state_pre_hook(lambda models, folder: tracker.load_state(folder))
        return tracker

    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based) succeeded."""
        if self.enabled and step % self.every == 0:
            self._follow_devices()
            self.model.step(self.parameters)

    def _follow_devices(self) -> None:
        """Keep each shadow tensor where its weight is (block swap may hold a block elsewhere than at start)."""
        shadows = self.model.shadow_params
        for i, (shadow, weight) in enumerate(zip(shadows, self.parameters)):
            if shadow.device != weight.device:
                shadows[i] = shadow.to(weight.device)

    @contextmanager
    def applied(self):
        """The trained parameters hold the EMA weights inside the block, their own weights after it."""
        self.model.store(self.parameters)
        self.model.copy_to(self.parameters)
        try:
            yield
        finally:
            self.model.restore(self.parameters)

    def sampling(self):
        """Context for rendering sample images: the EMA weights with --sample_with_ema."""
        return self.applied() if self.for_samples else nullcontext()

    def save(self, save, path: str, metadata: dict) -> list[str]:
        """Write the run's weights through `save(path, metadata)`: raw and `-ema`, or EMA only."""
        if not self.enabled:
            save(path, metadata)
            return [path]
        ema_metadata = {**metadata, "ss_ema": "True", "ss_ema_decay": str(self.decay),
                        "ss_ema_updates": str(self.model.optimization_step)}
        if self.save_only:
            with self.applied():
                save(path, ema_metadata)
            return [path]
        save(path, metadata)
        with self.applied():
            save(ema_path(path), ema_metadata)
        return [path, ema_path(path)]

    # ---- resumable state ----------------------------------------------------------------------

    def save_state(self, folder: str) -> None:
        from safetensors.torch import save_file

        if not self.is_main_process:
            return
        tensors = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(self.model.shadow_params)}
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, EMA_STATE_FILE),
                  metadata={"optimization_step": str(self.model.optimization_step), "decay": str(self.decay),
                            "tensors": json.dumps(len(tensors))})

    def load_state(self, folder: str) -> None:
        from safetensors import safe_open

        path = os.path.join(folder, EMA_STATE_FILE)
        if not os.path.isfile(path):
            raise UserError(f"--resume {folder}: the state has no EMA ({EMA_STATE_FILE}); it was saved without --ema. "
                            "Resume without --ema, or start a new run")
        with safe_open(path, "pt") as f:
            count = len(list(f.keys()))
            if count != len(self.parameters):
                raise UserError(f"{path}: EMA of {count} tensors, this run trains {len(self.parameters)}; "
                                "resume with the network/model flags of the saved run")
            shadows = [f.get_tensor(f"shadow.{i}") for i in range(count)]
            self.model.optimization_step = int(f.metadata()["optimization_step"])
        self.model.shadow_params = [s.to(device=p.device, dtype=p.dtype) for s, p in zip(shadows, self.parameters)]
        logger.info("EMA restored from %s (%d updates)", path, self.model.optimization_step)
