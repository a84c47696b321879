"""The two training modes: a network (LoRA) on frozen weights, or a full fine-tune.

A mode decides which weights train, builds their optimizer parameter groups, and writes the
trained result. `TrainingMode` is what the trainer asks of either: `prepare`, `trainable_modules`,
`trains_text_encoder`, `save`, `save_extension` and `architecture_suffix`. Before any model is
loaded, families and flag checks need only the mode's `ModeKind` (is it a full fine-tune, will it
train text encoders): the kind is passed to them explicitly, never guessed from which flags the
parser happened to register.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from library.errors import UserError
from library.models.saved_formats import extension_for, family_format, save_ckpt

logger = logging.getLogger(__name__)


def freeze(module) -> None:
    if module is not None:
        module.requires_grad_(False)


@dataclass(frozen=True)
class ModeKind:
    """Which mode a run trains in: what families and flag checks may ask before the mode is built."""

    name: str  # "network" or "full"

    @property
    def is_full_fine_tune(self) -> bool:
        """True: the model's own weights train (and are saved); False: a network on frozen weights."""
        return self.name == "full"

    def trains_text_encoders(self, args) -> bool:
        """Whether the flags ask for text-encoder training (a LoRA trains them unless
        --network_train_unet_only; a full fine-tune only with --train_text_encoder)."""
        if self.is_full_fine_tune:
            return bool(args.train_text_encoder)
        return not args.network_train_unet_only

    @property
    def text_encoder_off_switch(self) -> str:
        """How a user keeps the text encoders frozen in this mode, for error messages."""
        return "no --train_text_encoder" if self.is_full_fine_tune else "--network_train_unet_only"


NETWORK, FULL = ModeKind("network"), ModeKind("full")
MODE_KINDS = {kind.name: kind for kind in (NETWORK, FULL)}


class TrainingMode(ABC):
    """What the trainer asks of a training mode."""

    kind: ModeKind
    save_extension: str  # ".safetensors", ".ckpt", or "" for a diffusers folder
    architecture_suffix: str = ""  # appended to modelspec.architecture ("/lora" for LoRA files)

    def __init__(self, family, args):
        self.family, self.args = family, args

    @property
    @abstractmethod
    def trains_text_encoder(self) -> bool: ...

    @abstractmethod
    def prepare(self, components) -> list[dict]:
        """Freeze what stays frozen, set up what trains; returns the optimizer parameter groups."""

    @abstractmethod
    def trainable_modules(self, components) -> list:
        """The modules whose parameters train (for placement, clipping, eval/train switches)."""

    @abstractmethod
    def save(self, components, path: str, dtype, metadata: dict) -> None:
        """Write the trained result to `path` (+ save_extension)."""


class NetworkMode(TrainingMode):
    """Trains a network module (networks.lora by default) attached to frozen model weights."""

    kind = NETWORK
    save_extension = ".safetensors"
    architecture_suffix = "/lora"

    def __init__(self, family, args):
        from networks.network_arguments import validate_network_args

        super().__init__(family, args)
        validate_network_args(args, family.network_arg_keys)
        self.network = None

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.network.text_encoder_modules) and self.args.text_encoder_lr != 0

    def prepare(self, components) -> list[dict]:
        from networks.network_arguments import create_network_kwargs, import_network_module

        args = self.args
        for part in [components.denoiser, components.vae, *components.text_encoders]:
            freeze(part)
        module = import_network_module(args.network_module)
        kwargs = create_network_kwargs(args, self.family.network_arg_keys)
        self.network = module.create_network(self.family.lora_targets(components), **kwargs)
        if args.network_weights:
            self.network.load_weights(args.network_weights)
            logger.info("continuing from network weights %s", args.network_weights)
        self.network.apply_to()
        return self.network.prepare_optimizer_params(args.unet_lr, args.text_encoder_lr, args.learning_rate)

    def trainable_modules(self, components) -> list:
        return [self.network]

    def save(self, components, path: str, dtype, metadata: dict) -> None:
        network = self.network.module if hasattr(self.network, "module") else self.network
        network.save_weights(path, dtype, metadata)


class FullFineTuneMode(TrainingMode):
    """Trains the denoiser's weights (and the text encoders' with --train_text_encoder)."""

    kind = FULL

    def __init__(self, family, args):
        super().__init__(family, args)
        self.trained_text_encoders: list | None = None  # known after prepare()
        self.save_extension = extension_for(args.save_model_as)

    @property
    def trains_text_encoder(self) -> bool:
        if self.trained_text_encoders is None:
            return bool(self.args.train_text_encoder)
        return bool(self.trained_text_encoders)

    def text_encoder_lr(self, index: int) -> float:
        """--learning_rate_te<N> where the family has one (SDXL), else --learning_rate_te, else --learning_rate."""
        args = self.args
        for lr in (getattr(args, f"learning_rate_te{index + 1}", None), args.learning_rate_te):
            if lr is not None:
                return lr
        return args.learning_rate

    def prepare(self, components) -> list[dict]:
        freeze(components.vae)
        components.denoiser.requires_grad_(True)
        groups = [{"params": [p for p in components.denoiser.parameters()], "lr": self.args.learning_rate}]
        self.trained_text_encoders = []
        for index, encoder in enumerate(components.text_encoders):
            lr = self.text_encoder_lr(index) if self.args.train_text_encoder else 0
            encoder.requires_grad_(lr != 0)  # as in sd-scripts, a learning rate of 0 leaves the encoder frozen
            if lr != 0:
                self.trained_text_encoders.append(encoder)
                groups.append({"params": list(encoder.parameters()), "lr": lr})
        if self.args.train_text_encoder and not self.trained_text_encoders:
            raise UserError("--train_text_encoder with every text-encoder learning rate 0 trains no text encoder: "
                            "drop --train_text_encoder or set a non-zero text-encoder learning rate")
        return groups

    def trainable_modules(self, components) -> list:
        return [components.denoiser] + list(self.trained_text_encoders or [])

    def save(self, components, path: str, dtype, metadata: dict) -> None:
        """The family's single file or diffusers folder; a ckpt holds the single file's tensors."""
        save_as = self.args.save_model_as
        if save_as != "ckpt":
            self.family.save_full_model(components, path, family_format(save_as), dtype, metadata)
            return
        save_ckpt(lambda tensors_path: self.family.save_full_model(components, tensors_path, "safetensors", dtype,
                                                                   metadata),
                  path, int(metadata.get("ss_epoch", 0)), int(metadata.get("ss_steps", 0)))


def make_mode(kind: ModeKind, family, args) -> TrainingMode:
    return FullFineTuneMode(family, args) if kind.is_full_fine_tune else NetworkMode(family, args)
