"""The model-family interface the generic trainer, tools and networks talk to.

A family (SD 1.x, SDXL, FLUX, SD3, Lumina 2) owns everything that differs per model: its flags,
how its components load and save, its four strategies, its noise scheme and training target, how
its denoiser is called, and which modules LoRA targets under which file names. Generic code never
branches on a family's name; when it would need to, add a method here.

Three kinds of value keep a family free of hidden state: `FamilySettings` (the run's family flags,
validated once by `settings_from_args` for a mode's `ModeKind`, frozen), `ModelComponents` (what
`load` returned, with facts read from the checkpoint as typed fields) and `LoraFileLayout` (how
LoRA files name layers, for the tools that work on files without a model). Block swap is written
once in library/offload.py; a family only says which block lists swap (`block_swap_groups`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from library.training.modes import NETWORK, ModeKind

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
    """The loaded parts of one model. Lists hold one entry per text encoder, in file order.

    Facts learned from the checkpoint live here as typed fields (families subclass this for their
    own, e.g. FLUX's `is_schnell`), never on the family object."""

    denoiser: Any  # UNet2DConditionModel / transformer
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any  # a diffusers scheduler holding the training noise schedule
    source: str = ""  # what --pretrained_model_name_or_path pointed at, for metadata
    text_encoders_fingerprint: str = ""  # names the loaded text encoders in text-encoder cache files


@dataclass(frozen=True)
class FamilySettings:
    """A family's flags for one run, validated once by `ModelFamily.settings_from_args` (families
    subclass this with their own fields). Frozen: nothing changes it after validation."""

    kind: ModeKind = NETWORK  # the training mode's kind (LoRA or full fine-tune)
    blocks_to_swap: int = 0  # --blocks_to_swap where the family has it (library/offload.py)
    weight_storage: Any = None  # library.config.weight_storage_args.WeightStorage (fp8/int8/nf4 frozen weights)


@dataclass(frozen=True)
class LoraBlockLayout:
    """sd-scripts' numbering of a UNet's blocks, for per-block LoRA ranks and learning rates
    (`block_dims`, `down_lr_weight`, ... in networks/lora_blocks.py).

    Blocks run [extra] + IN (down) + MID (mid) + OUT (up) + [extra]: SD 1.x/2.x has 12 + 1 + 12 = 25
    blocks, SDXL 1 + 9 + 3 + 9 + 1 = 23 (its time/label embedding and its output layers are the extra
    blocks, which the lr-weight keys do not name). `block_index` maps a kohya module name to its block
    (None: the module lies in no numbered block and keeps the network-wide settings).
    """

    down: int
    mid: int
    extra: int
    block_index: Callable[[str], Optional[int]]

    @property
    def count(self) -> int:
        return 2 * self.extra + 2 * self.down + self.mid


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
    # layers one LoRA module covers because the file fuses them (BFL's qkv): container class -> groups
    # of child paths relative to the container, in the fused tensor's row order (networks/lora_fused.py)
    fused_groups: dict = field(default_factory=dict)
    module_rank: Optional[Callable[[str], Optional[int]]] = None  # file name -> rank (None: default, 0: none)
    network_args: dict = field(default_factory=dict)  # family --network_args that shaped this target
    diffusers_prefix: str = ""  # pipeline component for PEFT/diffusers keys ("transformer", "text_encoder")
    save_format: str = "kohya"  # LoRA file layout: "kohya" or "diffusers" (PEFT keys)
    block_layout: Optional[LoraBlockLayout] = None  # numbered UNet blocks (per-block ranks and lrs)

    def file_name(self, module_path: str) -> str:
        path = self.rename(module_path) if self.rename else module_path
        return f"{self.prefix}_" + (self.file_path_prefix + path).replace(".", "_")


@dataclass(frozen=True)
class LoraWeightSlice:
    """A LoRA module that changes one checkpoint tensor: W[rows] += scale * up[up_rows] @ down.

    `rows` (start, stop) along dim 0 is set where the checkpoint fuses several layers into one tensor
    (e.g. OpenCLIP's in_proj = q, k, v); `up_rows` where the LoRA module is the fused one and the
    checkpoint holds the layers apart (a BFL-named FLUX LoRA into a diffusers folder). None: all rows.
    """

    lora_name: str  # kohya module name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    rows: Optional[tuple[int, int]] = None
    up_rows: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class LoraModuleNames:
    """One layer a LoRA may change, named as in each LoRA file layout (library/lora_formats.py)."""

    kohya: str  # "lora_unet_down_blocks_0_attentions_0_proj_in"
    diffusers: str  # PEFT module path with the pipeline component: "unet.down_blocks.0.attentions.0.proj_in"
    comfy: str  # ComfyUI's generic name: "diffusion_model.input_blocks.1.1.proj_in"


class LoraFileLayout:
    """How one family's LoRA files name the layers they change, for the tools that work on files
    without a model (tools/merge_lora.py, tools/convert_lora.py). Families subclass it in their
    `*_lora_names.py` module; this base answers "not supported yet"."""

    # text encoders that single-file models of this family keep in files of their own: component ->
    # usual file name, in the order tools/merge_lora.py --text_encoders takes them; empty: in the checkpoint
    separate_text_encoder_components: dict[str, str] = {}

    def __init__(self, display_name: str) -> None:
        self.display_name = display_name

    def checkpoint_slices(self, shapes: dict, component: str) -> dict[str, list[LoraWeightSlice]]:
        """Which kohya LoRA modules change which tensors of one checkpoint file (tools/merge_lora.py).

        `shapes` maps the file's tensor names to shape-only stand-ins (`.shape`, `.ndim`); `component`
        is "checkpoint" for a single-file model, else the diffusers subfolder ("unet", "text_encoder",
        "transformer", ...). Tensors no LoRA can change are left out.
        """
        from library.errors import UserError

        raise UserError(f"tools/merge_lora.py cannot merge into {self.display_name} checkpoints yet")

    def module_names(self) -> list[LoraModuleNames]:
        """Every layer a LoRA file of this family may name (at the largest released model size), in
        each layout, so LoRA files convert between layouts without loading a model."""
        from library.errors import UserError

        raise UserError(f"tools/convert_lora.py cannot convert {self.display_name} LoRA files yet")

    def fused_module_names(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """kohya name of each LoRA module on a linear the kohya/ComfyUI layouts fuse (BFL's qkv) ->
        (its ComfyUI name, the diffusers module names it covers, in row order). Empty: none."""
        return {}

    def fused_row_sizes(self, kohya_name: str, down, up) -> list[int]:
        """Rows of each member in a fused module's up weight (see fused_module_names)."""
        raise NotImplementedError(f"{self.display_name} has no fused LoRA modules")


class ModelFamily(ABC):
    """One model family. A family object never changes after construction: `get_family(name)` gives
    one with default settings (enough for flags, LoRA targets and the file tools); `configure(args,
    kind)` validates a run's flags once and returns a new object holding them as `settings`."""

    name: str  # "sd", "sdxl", "flux", "sd3", "lumina"
    display_name: str  # "Stable Diffusion 1.x/2.x", for --help and messages
    base_model_version: str  # ss_base_model_version written into LoRA metadata, e.g. "sd_v1"
    modelspec_name: str  # modelspec.architecture prefix, e.g. "stable-diffusion-v1"
    settings_class: type = FamilySettings
    network_arg_keys: tuple[str, ...] = ()  # --network_args keys the family reads (networks.lora sees the rest)
    metadata_flags: tuple[str, ...] = ()  # family flags written into LoRA/model metadata as ss_<flag>
    # With cached text-encoder outputs, a LoRA run trains the denoiser only, with one log line (sd-scripts'
    # FLUX/SD3/Lumina scripts), instead of refusing the combination (its SD/SDXL scripts).
    text_cache_trains_denoiser_only: bool = False
    has_block_lists: bool = False  # block_swap_groups names its block lists (--blocks_to_swap, blockwise optimizers)
    # --base_weights_dtype / --fp8_base: regexes of the denoiser's Linear paths that stay in the training dtype
    full_precision_modules: tuple[str, ...] = ()
    # indexes into ModelComponents.text_encoders that --text_encoder_weights_dtype stores (T5-XXL, Gemma-2)
    large_text_encoders: tuple[int, ...] = ()

    def __init__(self, settings: Optional[FamilySettings] = None) -> None:
        self.settings = settings if settings is not None else self.settings_class()

    # ---- flags and settings -------------------------------------------------------------------------

    def add_arguments(self, parser: "argparse.ArgumentParser") -> None:
        """Add this family's own flags (e.g. --v2, --clip_skip)."""

    def add_noise_arguments(self, parser: "argparse.ArgumentParser") -> None:
        """The noise/timestep/loss-weighting flags of this family's training objective (DDPM here)."""
        from library.training.noise import add_noise_arguments

        add_noise_arguments(parser)

    def settings_from_args(self, args: "argparse.Namespace", kind: ModeKind) -> FamilySettings:
        """Validate this family's flags for a run in mode `kind` (UserError for flags without effect);
        reads args, never changes them."""
        return self.settings_class(kind=kind)

    def configure(self, args: "argparse.Namespace", kind: ModeKind) -> "ModelFamily":
        """A family object of the same class holding the settings validated from args."""
        from dataclasses import replace

        from library.config.weight_storage_args import WeightStorage

        settings = self.settings_from_args(args, kind)
        return type(self)(replace(settings, weight_storage=WeightStorage.from_args(args, kind, self)))

    # ---- loading and placing ------------------------------------------------------------------------

    @abstractmethod
    def load(self, args: "argparse.Namespace", with_vae: bool = True) -> ModelComponents:
        """Load from --pretrained_model_name_or_path (single file, diffusers folder or hub id).

        with_vae=False (every latent is already in a valid cache file): the returned
        ModelComponents.vae is None and no VAE weights are read (--vae / --ae are not needed)."""

    def load_vae(self, args: "argparse.Namespace"):
        """Only the VAE, for tools/cache_latents.py (families override this to skip the other weights)."""
        return self.load(args).vae

    def place_denoiser(self, components: ModelComponents, device, dtype) -> None:
        """Move the denoiser to the training device and dtype; with --blocks_to_swap the swapped blocks
        stay in CPU memory (library/offload.py) and visit the device as they run."""
        from library.devices import move_module

        swap = self.settings.blocks_to_swap
        if swap:
            from library.offload import require_cuda

            require_cuda(device)
        self._store_frozen_weights(components.denoiser, self.denoiser_storage, self.full_precision_modules, device)
        move_module(components.denoiser, "cpu" if swap else device, dtype)
        if swap:
            self.start_block_swap(components.denoiser, device)

    def place_text_encoder(self, components: ModelComponents, index: int, device, dtype) -> None:
        """Move text encoder `index` to the training device and dtype, its Linear weights stored in
        --text_encoder_weights_dtype when it is one of the family's large text encoders."""
        from library.devices import move_module

        encoder = components.text_encoders[index]
        storage = self.text_encoder_storage if index in self.large_text_encoders else None
        self._store_frozen_weights(encoder, storage, (), device)
        move_module(encoder, device, dtype)

    @property
    def denoiser_storage(self) -> Optional[str]:
        """fp8/int8/nf4 for the denoiser's frozen Linear weights, or None."""
        return self.settings.weight_storage.denoiser if self.settings.weight_storage else None

    @property
    def text_encoder_storage(self) -> Optional[str]:
        """fp8/int8/nf4 for the large text encoders' frozen Linear weights, or None."""
        return self.settings.weight_storage.text_encoders if self.settings.weight_storage else None

    @staticmethod
    def _store_frozen_weights(module, storage: Optional[str], keep: Sequence[str], device) -> None:
        """Quantize `module`'s Linear weights (library/quantized_base.py), each on the training device."""
        if storage and module is not None:
            from library.quantized_base import quantize_linears

            quantize_linears(module, storage, keep=keep, device=device)

    def block_swap_groups(self, denoiser, blocks_to_swap: int) -> list[tuple[str, Sequence, int]]:
        """Which blocks --blocks_to_swap swaps: (name, block list, how many of it) per list of the
        denoiser; UserError when the model cannot swap that many. Families with the flag override this."""
        raise NotImplementedError(f"{self.display_name} has no block swap")

    def start_block_swap(self, denoiser, device):
        """Swap the family's blocks of a denoiser held in CPU memory, the rest of it moved to device."""
        from library.offload import CudaTransferBackend, place_with_block_swap

        groups = self.block_swap_groups(denoiser, self.settings.blocks_to_swap)
        return place_with_block_swap(denoiser, groups, CudaTransferBackend(device),
                                     trains_weights=self.settings.kind.is_full_fine_tune)

    # ---- strategies ---------------------------------------------------------------------------------

    @abstractmethod
    def tokenize_strategy(self, args, components: ModelComponents) -> "TokenizeStrategy": ...

    @abstractmethod
    def text_encoding_strategy(self, args) -> "TextEncodingStrategy": ...

    @abstractmethod
    def latents_caching_strategy(self, args) -> "LatentsCachingStrategy": ...

    def text_encoder_outputs_caching_strategy(
        self, args, components: ModelComponents
    ) -> Optional["TextEncoderOutputsCachingStrategy"]:
        return None

    # ---- training -----------------------------------------------------------------------------------

    @abstractmethod
    def noise_scheme(self, args, components: ModelComponents):
        """The library.training.noise.NoiseScheme that samples timesteps/noise and gives targets."""

    def objective_metadata(self, components: ModelComponents) -> dict[str, str]:
        """sd-scripts' ss_* keys for this family's objective settings (flow matching: timestep sampling,
        prediction type, ...) and the loaded model; written into every saved file."""
        return {}

    @abstractmethod
    def predict(
        self, components: ModelComponents, noisy_latents: "torch.Tensor", timesteps: "torch.Tensor",
        conditioning: "Conditioning", batch: dict,
    ) -> "torch.Tensor":
        """Call the denoiser; returns its output with the shape of noisy_latents (the noise scheme's
        prediction_for_loss turns it into what the loss compares with the target)."""

    @abstractmethod
    def lora_targets(self, components: ModelComponents) -> list[LoraTarget]:
        """Every part LoRA may attach to (denoiser first, then each text encoder)."""

    # ---- saving -------------------------------------------------------------------------------------

    def modelspec_architecture(self, components: ModelComponents) -> str:
        """modelspec.architecture of the loaded model (FLUX tells dev from schnell by its weights)."""
        return self.modelspec_name

    @abstractmethod
    def save_full_model(
        self, components: ModelComponents, path: str, save_as: str, dtype: "torch.dtype", metadata: dict
    ) -> None:
        """Write a full fine-tune: save_as "safetensors" (single file) or "diffusers" (folder)."""

    def lora_file_layout(self) -> LoraFileLayout:
        """How this family's LoRA files name layers (for the tools that work on files alone)."""
        return LoraFileLayout(self.display_name)

    # ---- sample images during training (library/training/sampling.py) -----------------------------

    sample_size_multiple = 64  # sample widths/heights are rounded down to this (latent stride of the denoiser)
    sample_default_steps = 30  # sd-scripts' default when a prompt has no --s

    @abstractmethod
    def build_pipeline(self, components: ModelComponents, scheduler=None):
        """A diffusers pipeline over the in-memory components (no second copy), for sampling."""

    def image_to_image_pipeline(self, pipeline):
        """diffusers' img2img pipeline over the components of a `build_pipeline` pipeline
        (tools/generate.py --image_path)."""
        from diffusers import AutoPipelineForImage2Image

        from library.errors import UserError

        try:
            return AutoPipelineForImage2Image.from_pipe(pipeline)
        except ValueError:
            raise UserError(f"--image_path: diffusers has no image-to-image pipeline for {self.display_name} "
                            f"({type(pipeline).__name__}); generate from text only") from None

    def sampling_scheduler(self, components: ModelComponents, sampler: str):
        """The diffusers scheduler for sd-scripts' sampler name (--sample_sampler / --ss); DDPM-trained
        families get it from their training noise schedule, others override this."""
        from library.training.sampling import ddpm_sampling_scheduler

        return ddpm_sampling_scheduler(components.noise_scheduler, sampler)

    def sample_pipeline_kwargs(self, prompt, args, components: ModelComponents) -> dict:
        """Pipeline call arguments of one SamplePrompt besides prompt, size, steps and generator:
        here classifier-free guidance (--l, default 7.5 as in sd-scripts) and the negative prompt."""
        kwargs = {"guidance_scale": 7.5 if prompt.scale is None else prompt.scale}
        if prompt.negative_prompt:
            kwargs["negative_prompt"] = prompt.negative_prompt
        return kwargs

    def unused_sample_options(self, prompt, components: ModelComponents) -> list[str]:
        """Prompt-file options (e.g. "--g") that this family's sampling ignores, for a warning."""
        return ["--g"] if prompt.guidance_scale is not None else []
