"""The model-family interface the generic trainer, tools and networks talk to.

A family (SD 1.x, SDXL, FLUX, SD3, Lumina 2) owns everything that differs per model: its flags,
how its components load and save, its four strategies, its noise scheme and training target, how
its denoiser is called, and which modules LoRA targets under which file names. Generic code never
branches on a family's name; when it would need to, add a method here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import argparse

    import torch

    from library.strategies import (
        Conditioning,
        LatentsCachingStrategy,
        TextEncoderOutputsCachingStrategy,
        TextEncodingStrategy,
        TokenizeStrategy,
    )


@dataclass
class ModelComponents:
    """The loaded parts of one model. Lists hold one entry per text encoder, in file order."""

    denoiser: Any  # UNet2DConditionModel / transformer
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any  # a diffusers scheduler holding the training noise schedule
    source: str = ""  # what --pretrained_model_name_or_path pointed at, for metadata
    extra: dict = field(default_factory=dict)


@dataclass
class LoraTarget:
    """One model part LoRA can attach to, and how its modules are named in kohya files.

    Linear and 1x1 Conv2d layers inside modules whose class name is in `container_classes` get LoRA;
    3x3 Conv2d layers inside `conv3x3_container_classes` get LoRA only when conv_dim is set.
    File name of a module = f"{prefix}_" + (file_path_prefix + rename(path)).replace(".", "_").
    """

    prefix: str  # "lora_unet", "lora_te", "lora_te1", ...
    root: Any  # torch.nn.Module
    container_classes: tuple[str, ...]
    conv3x3_container_classes: tuple[str, ...] = ()
    file_path_prefix: str = ""
    rename: Optional[Callable[[str], str]] = None
    is_text_encoder: bool = False

    def file_name(self, module_path: str) -> str:
        path = self.rename(module_path) if self.rename else module_path
        return f"{self.prefix}_" + (self.file_path_prefix + path).replace(".", "_")


class ModelFamily(ABC):
    """One model family. Subclasses are stateless apart from what their constructor stores."""

    name: str  # "sd", "sdxl", "flux", "sd3", "lumina"
    display_name: str  # "Stable Diffusion 1.x/2.x", for --help and messages
    base_model_version: str  # ss_base_model_version written into LoRA metadata, e.g. "sd_v1"
    modelspec_architecture: str  # modelspec.architecture prefix, e.g. "stable-diffusion-v1"

    def add_arguments(self, parser: "argparse.ArgumentParser") -> None:
        """Add this family's own flags (e.g. --v2, --clip_skip)."""

    def add_noise_arguments(self, parser: "argparse.ArgumentParser") -> None:
        """The noise/timestep/loss-weighting flags of this family's training objective (DDPM here)."""
        from library.training.noise import add_noise_arguments

        add_noise_arguments(parser)

    def validate_args(self, args: "argparse.Namespace") -> None:
        """Raise UserError for flags that have no effect for this family."""

    def place_denoiser(self, components: ModelComponents, device, dtype, args) -> None:
        """Move the denoiser to the training device and dtype (block-swapping families keep some
        blocks on the CPU here)."""
        from library.training.trainer import move_module

        move_module(components.denoiser, device, dtype)

    @abstractmethod
    def load(self, args: "argparse.Namespace") -> ModelComponents:
        """Load from --pretrained_model_name_or_path (single file, diffusers folder or hub id)."""

    @abstractmethod
    def tokenize_strategy(self, args, components: ModelComponents) -> "TokenizeStrategy": ...

    @abstractmethod
    def text_encoding_strategy(self, args) -> "TextEncodingStrategy": ...

    @abstractmethod
    def latents_caching_strategy(self, args) -> "LatentsCachingStrategy": ...

    def text_encoder_outputs_caching_strategy(self, args) -> Optional["TextEncoderOutputsCachingStrategy"]:
        return None

    @abstractmethod
    def noise_scheme(self, args, components: ModelComponents):
        """The library.training.noise.NoiseScheme that samples timesteps/noise and gives targets."""

    @abstractmethod
    def predict(
        self, components: ModelComponents, noisy_latents: "torch.Tensor", timesteps: "torch.Tensor",
        conditioning: "Conditioning", batch: dict,
    ) -> "torch.Tensor":
        """Call the denoiser; returns a prediction with the shape of noisy_latents."""

    @abstractmethod
    def lora_targets(self, components: ModelComponents) -> list[LoraTarget]:
        """Every part LoRA may attach to (denoiser first, then each text encoder)."""

    @abstractmethod
    def build_pipeline(self, components: ModelComponents, scheduler=None):
        """A diffusers pipeline over the in-memory components (no second copy), for sampling."""

    @abstractmethod
    def save_full_model(
        self, components: ModelComponents, path: str, save_as: str, dtype: "torch.dtype", metadata: dict
    ) -> None:
        """Write a full fine-tune: save_as "safetensors" (single file) or "diffusers" (folder)."""
