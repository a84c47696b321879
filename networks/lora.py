"""The LoRA network: `create_network` builds one from a family's `LoraTarget`s, `LoRANetwork` trains it.

This is `--network_module networks.lora`. It follows sd-scripts' networks/lora.py in behaviour and
file format (kohya keys, alpha scaling, conv_dim for 3x3 convolutions, rank/module dropout, LoRA+
learning-rate ratios) but is family-agnostic: which layers get LoRA and how they are named in files
comes from the family's targets. The layer adapters live in networks/lora_modules.py (one layer) and
networks/lora_fused.py (layers a file fuses, e.g. FLUX's qkv), file reading/writing in
networks/lora_files.py. Targets may set per-module ranks (`module_rank`), number their blocks for
sd-scripts' per-block ranks and learning rates (`block_layout`, networks/lora_blocks.py) and ask for
PEFT/diffusers keys instead of kohya names (`save_format`, written by `diffusers_state_dict`).
With `use_dora=True` (or LyCORIS' LoHa/LoKr through networks/lycoris.py, which builds the same network)
the modules are networks/weight_adapters.py's, saved with LyCORIS' keys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from library.errors import UserError, did_you_mean
from library.families.base import LoraTarget
from networks.lora_blocks import BLOCK_KEYS, BlockPlan, parse_block_arg
from networks.lora_files import file_alpha, group_by_module, read_lora_file, save_lora_file
from networks.lora_fused import FusedLoRAModule
from networks.lora_modules import FoundLayer, LoRAModule, find_lora_layers
from networks.weight_adapters import build_weight_adapter, load_adapter_weights

logger = logging.getLogger(__name__)

NETWORK_MODULE_NAME = "networks.lora"
DEFAULT_NETWORK_DIM = 4  # sd-scripts' LoRA default when --network_dim is not given
DEFAULT_NETWORK_ALPHA = 1.0
DEFAULT_CONV_ALPHA = 1.0  # sd-scripts: conv_dim without conv_alpha means conv_alpha 1


# ---------------------------------------------------------------------------------------------
# Options: --network_dim/--network_alpha/--network_dropout and the --network_args keys


def _number(kind: type, low: float, low_inclusive: bool, high: float | None = None) -> Callable[[str, str], float]:
    bounds = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")

    def parse(key: str, text: str):
        try:
            value = kind(text)
        except ValueError:
            raise UserError(f"--network_args {key}={text}: expected {'an integer' if kind is int else 'a number'}")
        too_low = value < low if low_inclusive else value <= low
        if too_low or (high is not None and value >= high):
            raise UserError(f"--network_args {key}={text}: must be {bounds}")
        return value

    return parse


def parse_bool(key: str, text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0"):
        raise UserError(f"--network_args {key}={text}: expected True or False")
    return lowered in ("true", "1")


NETWORK_ARG_PARSERS: dict[str, Callable[[str, str], float]] = {
    "conv_dim": _number(int, 1, True),
    "conv_alpha": _number(float, 0, True),
    "rank_dropout": _number(float, 0, True, 1),
    "module_dropout": _number(float, 0, True, 1),
    "loraplus_lr_ratio": _number(float, 0, False),
    "loraplus_unet_lr_ratio": _number(float, 0, False),
    "loraplus_text_encoder_lr_ratio": _number(float, 0, False),
    "use_dora": parse_bool,
}


@dataclass(frozen=True)
class LoRAOptions:
    dim: int = DEFAULT_NETWORK_DIM
    alpha: float = DEFAULT_NETWORK_ALPHA
    dropout: float | None = None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    network_args: dict[str, str] = field(default_factory=dict)  # as the user wrote them, for metadata
    block_args: dict = field(default_factory=dict)  # the per-block keys, parsed (networks/lora_blocks.py)
    use_dora: bool = False
    algo: str = "lora"  # "lora", "loha" or "lokr" (networks/lycoris.py sets the others)
    factor: int = -1  # LoKr's factorization limit
    decompose_both: bool = False  # LoKr: factorise w1 too
    network_module: str = NETWORK_MODULE_NAME  # ss_network_module in the metadata

    @property
    def uses_weight_adapters(self) -> bool:
        """LoHa, LoKr or DoRA: modules that build a weight change (networks/weight_adapters.py)."""
        return self.algo != "lora" or self.use_dora

    def loraplus_ratio(self, text_encoder: bool) -> float | None:
        specific = self.loraplus_text_encoder_lr_ratio if text_encoder else self.loraplus_unet_lr_ratio
        return specific if specific is not None else self.loraplus_lr_ratio


def parse_lora_options(
    network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
    network_args: dict[str, str] | None = None,
) -> LoRAOptions:
    """Validate every LoRA setting; UserError naming the flag or --network_args key on a bad one."""
    network_args = dict(network_args or {})
    dim = DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    if dim < 1:
        raise UserError(f"--network_dim must be at least 1 (got {dim})")
    if alpha < 0:
        raise UserError(f"--network_alpha must not be negative (got {alpha}); 0 means alpha = rank")
    if network_dropout is not None and not 0 <= network_dropout < 1:
        raise UserError(f"--network_dropout must be in [0, 1) (got {network_dropout})")
    values, block_args = {}, {}
    for key, text in network_args.items():
        if key in BLOCK_KEYS:
            block_args[key] = parse_block_arg(key, str(text).strip())
            continue
        if key not in NETWORK_ARG_PARSERS:
            known = (*NETWORK_ARG_PARSERS, *BLOCK_KEYS)
            raise UserError(
                f"--network_args: unknown key `{key}` for networks.lora{did_you_mean(key, known)}; "
                f"known keys: {', '.join(known)}"
            )
        values[key] = NETWORK_ARG_PARSERS[key](key, str(text).strip())
    if "conv_alpha" in values and "conv_dim" not in values:
        raise UserError("--network_args conv_alpha needs conv_dim (LoRA on 3x3 convolutions is off without it)")
    if "conv_dim" in values:
        values.setdefault("conv_alpha", DEFAULT_CONV_ALPHA)
    if values.get("use_dora"):
        check_weight_adapter_dropouts("use_dora", network_dropout, values.get("rank_dropout"))
    return LoRAOptions(dim=dim, alpha=alpha, dropout=network_dropout, network_args=network_args, block_args=block_args,
                       **values)


def check_weight_adapter_dropouts(what: str, network_dropout: float | None, rank_dropout: float | None) -> None:
    """LoHa, LoKr and DoRA build a weight, not a down projection: only module_dropout applies to them."""
    if network_dropout:
        raise UserError(f"--network_dropout does not apply with {what} (it drops LoRA's down projection); "
                        "drop it or use --network_args module_dropout=...")
    if rank_dropout:
        raise UserError(f"--network_args rank_dropout does not apply with {what}; drop it or use module_dropout")


# ---------------------------------------------------------------------------------------------
# The network


class LoRANetwork(nn.Module):
    """All LoRA modules of one model; its state dict is a kohya LoRA file."""

    def __init__(self, options: LoRAOptions, layers: list[tuple[LoraTarget, FoundLayer]], multiplier: float = 1.0,
                 plans: dict[str, BlockPlan] | None = None):
        super().__init__()
        self.options = options
        self._plans = plans or {}  # target prefix -> its per-block plan
        self.multiplier = multiplier
        self._by_name: dict[str, LoRAModule] = {}
        self._text_encoder_names: set[str] = set()
        self._text_encoder_prefixes: dict[str, str] = {}  # module name -> file prefix of its encoder ("lora_te1")
        self._conv3x3_names: set[str] = set()
        self._diffusers_paths: dict[str, list[str]] = {}  # module name -> PEFT paths of its layers
        self._family_network_args: dict[str, str] = {}
        self._save_formats = {target.save_format for target, _ in layers} or {"kohya"}
        for target, found in layers:
            self._add_lora(target, found)
            self._family_network_args.update(target.network_args)
        self._applied = False

    def _add_lora(self, target: LoraTarget, found: FoundLayer) -> None:
        name = target.file_name(found.path)
        if name in self._by_name:
            raise ValueError(f"two layers map to the LoRA name {name}; the family's rename is not one-to-one")
        o = self.options
        rank, alpha = module_shape(target, found, o, self._plans.get(target.prefix))
        if o.uses_weight_adapters:
            members = [layer for _, layer in found.members] or [found.layer]
            module = build_weight_adapter(o, name, members, rank, alpha, self.multiplier)
        elif found.members:
            module = FusedLoRAModule(name, [layer for _, layer in found.members], rank, alpha, self.multiplier,
                                     o.dropout, o.rank_dropout, o.module_dropout)
        else:
            module = LoRAModule(name, found.layer, rank, alpha, self.multiplier,
                                o.dropout, o.rank_dropout, o.module_dropout)
        self.add_module(name, module)
        paths = [path for path, _ in found.members] or [found.path]
        if target.diffusers_prefix:
            self._diffusers_paths[name] = [f"{target.diffusers_prefix}.{path}" for path in paths]
        self._by_name[name] = module
        if target.is_text_encoder:
            self._text_encoder_names.add(name)
            self._text_encoder_prefixes[name] = target.prefix
        if found.is_conv3x3:
            self._conv3x3_names.add(name)

    @property
    def modules_by_name(self) -> dict[str, LoRAModule]:
        """kohya module name -> LoRAModule, in creation order (denoiser first)."""
        return dict(self._by_name)

    @property
    def text_encoder_modules(self) -> list[LoRAModule]:
        return [m for n, m in self._by_name.items() if n in self._text_encoder_names]

    @property
    def unet_modules(self) -> list[LoRAModule]:
        """Modules on the denoiser (UNet or transformer); sd-scripts calls them all "unet"."""
        return [m for n, m in self._by_name.items() if n not in self._text_encoder_names]

    def apply_to(self) -> None:
        """Hook every LoRA into its layer's forward; the layers' own weights are not changed."""
        if self._applied:
            raise RuntimeError("LoRA network is already applied")
        for module in self._by_name.values():
            module.attach()
        self._applied = True
        logger.info("LoRA applied: %d denoiser modules, %d text encoder modules",
                    len(self.unet_modules), len(self.text_encoder_modules))

    def remove(self) -> None:
        """Undo apply_to: the model computes exactly what it did before."""
        for module in self._by_name.values():
            module.detach()
        self._applied = False

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self._by_name.values():
            module.multiplier = multiplier

    # --- optimizer ---------------------------------------------------------------------------

    def prepare_optimizer_params(
        self, unet_lr: float | None, text_encoder_lr: float | list[float] | None, default_lr: float | None
    ) -> list[dict]:
        """Optimizer param groups. None lr = default_lr; lr 0 freezes that part and leaves it out.

        `text_encoder_lr` may hold one value per text encoder (in the family's encoder order, as
        sd-scripts assigns them); encoders past the list take its first value.
        With a LoRA+ ratio, each part's lora_up weights form a second group at lr * ratio.
        Each group carries a "name" ("unet", "unet lora_up", "text_encoder", "text_encoder2", ...) for logging.
        """
        groups = []
        parts = [("unet", self.unet_modules, unet_lr, False)]
        parts += [(part, modules, lr, True) for part, modules, lr in self._text_encoder_parts(text_encoder_lr)]
        for part, modules, lr, is_text_encoder in parts:
            if not modules:
                continue
            lr = default_lr if lr is None else lr
            if lr is None:
                raise UserError(f"no learning rate for the {part} LoRA: set --learning_rate")
            trainable = lr != 0
            for module in modules:
                module.requires_grad_(trainable)
            if trainable:
                for name, block_modules, weight in self._lr_blocks(part, modules):
                    groups += self._param_groups(name, block_modules, lr * weight,
                                                 self.options.loraplus_ratio(is_text_encoder))
        if not groups:
            raise UserError("every learning rate is 0 (--unet_lr/--text_encoder_lr/--learning_rate): nothing to train")
        return groups

    def _lr_blocks(self, part: str, modules: list[LoRAModule]) -> list[tuple[str, list[LoRAModule], float]]:
        """(group name, modules, lr weight): one entry per block where a per-block lr weight is set
        (sd-scripts' `unet_block<N>` groups), else one for the whole part."""
        plan = next((plan for plan in self._plans.values() if plan.lr_weights is not None), None)
        if plan is None:
            return [(part, modules, 1.0)]
        blocks: dict = {}
        for module in modules:
            block = plan.block_of(module.lora_name)
            name = part if block is None else f"{part}_block{block}"
            blocks.setdefault(block, (name, [], plan.lr_weight(module.lora_name)))[1].append(module)
        return list(blocks.values())

    def _text_encoder_parts(self, text_encoder_lr) -> list[tuple[str, list[LoRAModule], float | None]]:
        """(group name, modules, lr): one part for one lr, else one per text encoder."""
        lrs = text_encoder_lr if isinstance(text_encoder_lr, list) else [text_encoder_lr]
        if len(lrs) <= 1:
            return [("text_encoder", self.text_encoder_modules, lrs[0] if lrs else None)]
        by_encoder: dict[str, list[LoRAModule]] = {}
        for name, module in self._by_name.items():
            if name in self._text_encoder_prefixes:
                by_encoder.setdefault(self._text_encoder_prefixes[name], []).append(module)
        if len(lrs) > len(by_encoder):
            raise UserError(f"--text_encoder_lr has {len(lrs)} values but this LoRA covers {len(by_encoder)} text "
                            f"encoder(s) ({', '.join(by_encoder) or 'none'}); give one value per text encoder")
        return [(f"text_encoder{index + 1}", modules, lrs[index] if index < len(lrs) else lrs[0])
                for index, modules in enumerate(by_encoder.values())]

    @staticmethod
    def _param_groups(part: str, modules: list[LoRAModule], lr: float, loraplus_ratio: float | None) -> list[dict]:
        if loraplus_ratio is None:
            return [{"params": [p for m in modules for p in m.parameters()], "lr": lr, "name": part}]
        up = [m.lora_up.weight for m in modules]
        rest = [p for m in modules for p in m.parameters() if p is not m.lora_up.weight]  # lora_down, dora_scale
        return [{"params": rest, "lr": lr, "name": part},
                {"params": up, "lr": lr * loraplus_ratio, "name": f"{part} lora_up"}]

    # --- files -------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """sd-scripts' ss_network_* metadata describing this network."""
        o = self.options
        return {
            "ss_network_module": o.network_module,
            "ss_network_dim": str(o.dim),
            "ss_network_alpha": str(o.alpha),
            "ss_network_dropout": str(o.dropout),
            "ss_network_args": json.dumps({**o.network_args, **self._family_network_args}),
        }

    @property
    def diffusers_paths(self) -> dict[str, list[str]]:
        """kohya module name -> the PEFT/diffusers paths of the layers it changes (fused: several)."""
        return {name: list(paths) for name, paths in self._diffusers_paths.items()}

    @property
    def save_format(self) -> str:
        if len(self._save_formats) != 1:
            raise ValueError(f"LoRA targets ask for different file layouts {sorted(self._save_formats)}")
        return next(iter(self._save_formats))

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT/diffusers keys (`transformer.<path>.lora_A.weight`/`lora_B.weight`), alpha / rank folded
        into lora_B so loaders that assume alpha = rank apply the same update; fused modules give each
        member layer the shared lora_A and its rows of lora_B."""
        tensors = {}
        for name, module in self._by_name.items():
            if name not in self._diffusers_paths:
                raise UserError(f"LoRA module {name} has no diffusers name; save it with the kohya layout")
            up = module.lora_up.weight.detach() * module.scale
            rows = getattr(module, "row_ranges", [(0, up.shape[0])])
            for path, (start, stop) in zip(self._diffusers_paths[name], rows):
                tensors[f"{path}.lora_A.weight"] = module.lora_down.weight.detach().clone()  # one tensor per key
                tensors[f"{path}.lora_B.weight"] = up[start:stop]
        return tensors

    def save_weights(self, path: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write a kohya (or, when the targets ask, PEFT/diffusers) LoRA file atomically, tensors in
        `dtype` (None: as trained)."""
        state = self.diffusers_state_dict() if self.save_format == "diffusers" else self.state_dict()
        tensors = {k: (v.to(dtype) if dtype is not None else v) for k, v in state.items()}
        save_lora_file(tensors, path, {**(metadata or {}), **self.metadata()})

    def load_weights(self, path: str) -> int:
        """Load a kohya LoRA file (--network_weights) into the matching modules; returns how many.

        Every module in the file must exist in this network with the same rank, shapes and alpha;
        modules missing from the file keep their fresh initialisation.
        """
        if self.options.uses_weight_adapters:
            loaded = load_adapter_weights(self._by_name, read_lora_file(path), path)
            self._warn_missing(path, loaded)
            return loaded
        file_modules = group_by_module(read_lora_file(path), path)
        unknown = [name for name in file_modules if name not in self._by_name]
        if unknown:
            matched = len(file_modules) - len(unknown)
            raise UserError(
                f"{path}: only {matched} of its {len(file_modules)} LoRA modules match this network; "
                f"`{unknown[0]}` has no counterpart{did_you_mean(unknown[0], self._by_name)}. The file was made "
                "for another model or with other settings (conv_dim adds 3x3 conv modules, "
                "--network_train_unet_only drops text encoder modules)"
            )
        for name, file_module in file_modules.items():
            self._load_module(path, name, file_module)
        self._warn_missing(path, len(file_modules))
        return len(file_modules)

    def _warn_missing(self, path: str, loaded: int) -> None:
        missing = len(self._by_name) - loaded
        if missing:
            logger.warning("%s holds %d of the network's %d LoRA modules; the other %d start fresh",
                           path, loaded, len(self._by_name), missing)

    def _load_module(self, path: str, name: str, file_module) -> None:
        module = self._by_name[name]
        rank_flag, alpha_flag = (("--network_args conv_dim", "--network_args conv_alpha")
                                 if name in self._conv3x3_names else ("--network_dim", "--network_alpha"))
        if any(plan.block_of(name) is not None for plan in self._plans.values()):
            conv = "conv_" if name in self._conv3x3_names else ""
            rank_flag, alpha_flag = f"--network_args {conv}block_dims", f"--network_args {conv}block_alphas"
        file_rank = file_module.down.shape[0]
        if file_rank != module.rank:
            raise UserError(f"{path}: module `{name}` has rank {file_rank} but {rank_flag} is {module.rank}; "
                            f"use {rank_flag} {file_rank} to continue training this file")
        if (file_module.down.shape != module.lora_down.weight.shape
                or file_module.up.shape != module.lora_up.weight.shape):
            raise UserError(f"{path}: module `{name}` has shapes {tuple(file_module.down.shape)}/"
                            f"{tuple(file_module.up.shape)}, this model needs {tuple(module.lora_down.weight.shape)}/"
                            f"{tuple(module.lora_up.weight.shape)}: the file is for another model")
        self._check_alpha(path, name, module, file_module, alpha_flag)
        with torch.no_grad():
            module.lora_down.weight.copy_(file_module.down)
            module.lora_up.weight.copy_(file_module.up)

    @staticmethod
    def _check_alpha(path: str, name: str, module: LoRAModule, file_module, alpha_flag: str) -> None:
        got = file_alpha(file_module)
        # compare at the file's precision: a bf16 file stores 0.1 as 0.10009765625
        file_dtype = file_module.alpha.dtype if file_module.alpha is not None else torch.float32
        ours = module.alpha.to(file_dtype).float().item()
        if got != ours:
            raise UserError(f"{path}: module `{name}` has alpha {got:g} but {alpha_flag} is {module.alpha.item():g}; "
                            f"use {alpha_flag} {got:g} to continue training this file")


# ---------------------------------------------------------------------------------------------
# Construction


def create_network(
    targets: list[LoraTarget], *, network_dim: int | None, network_alpha: float | None,
    network_dropout: float | None = None, network_args: dict[str, str] | None = None,
    train_unet: bool = True, train_text_encoder: bool = True, multiplier: float = 1.0,
) -> LoRANetwork:
    """A LoRA network on the targets' layers (not yet hooked in: call apply_to())."""
    options = parse_lora_options(network_dim, network_alpha, network_dropout, network_args)
    return build_network(targets, options, train_unet, train_text_encoder, multiplier)


def build_network(targets: list[LoraTarget], options: LoRAOptions, train_unet: bool = True,
                  train_text_encoder: bool = True, multiplier: float = 1.0) -> LoRANetwork:
    """The network of validated options on the chosen targets' layers."""
    if not train_unet and not train_text_encoder:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    chosen = [t for t in targets if (train_text_encoder if t.is_text_encoder else train_unet)]
    if not chosen:
        part = "text encoder" if train_text_encoder and not train_unet else "denoiser"
        raise UserError(f"this model has no {part} LoRA can train; drop --network_train_*_only")
    plans = block_plans(chosen, options)
    layers = []
    for target in chosen:
        plan = plans.get(target.prefix)
        found = find_lora_layers(target, with_conv3x3=options.conv_dim is not None or bool(plan and plan.with_conv3x3))
        if not found:
            raise ValueError(f"LoRA target {target.prefix} has no Linear/Conv2d inside {target.container_classes}")
        layers += [(target, layer) for layer in found if module_shape(target, layer, options, plan)[0] != 0]
    if not layers:
        raise UserError("the --network_args select no module to train (every rank is 0 or every block is left out)")
    _reject_ineffective_options(options, layers)
    network = LoRANetwork(options, layers, multiplier, plans)
    logger.info("LoRA network: %d modules, rank %d, alpha %g%s", len(layers), options.dim, options.alpha,
                f", 3x3 convs rank {options.conv_dim} alpha {options.conv_alpha:g}" if options.conv_dim else "")
    return network


def block_plans(targets: list[LoraTarget], options: LoRAOptions) -> dict[str, BlockPlan]:
    """Target prefix -> its per-block plan, for the targets with numbered blocks (the UNet)."""
    if not options.block_args:
        return {}
    layouts = {t.prefix: t.block_layout for t in targets if t.block_layout is not None and not t.is_text_encoder}
    if not layouts:
        BlockPlan.build(None, options.block_args, options.dim, options.alpha, options.conv_dim, options.conv_alpha)
    return {prefix: BlockPlan.build(layout, options.block_args, options.dim, options.alpha, options.conv_dim,
                                    options.conv_alpha) for prefix, layout in layouts.items()}


def module_shape(target: LoraTarget, found: FoundLayer, options: LoRAOptions, plan: BlockPlan | None):
    """(rank, alpha) of the module on `found`: its block's, else the target's per-module rank, else
    the network's (--network_dim/--network_alpha, or conv_dim/conv_alpha for a 3x3 conv). Rank 0: no module."""
    name = target.file_name(found.path)
    shape = plan.rank_alpha(name, found.is_conv3x3) if plan else None
    if shape is not None:
        return shape
    if found.is_conv3x3:
        return (options.conv_dim or 0), options.conv_alpha
    return module_rank(target, name, options.dim), options.alpha


def module_rank(target: LoraTarget, name: str, default: int) -> int:
    """The rank of module `name`: the target's per-module choice, else the network's --network_dim."""
    chosen = target.module_rank(name) if target.module_rank else None
    return default if chosen is None else chosen


def _reject_ineffective_options(options: LoRAOptions, layers: list[tuple[LoraTarget, FoundLayer]]) -> None:
    if options.conv_dim is not None and not any(found.is_conv3x3 for _, found in layers):
        raise UserError("--network_args conv_dim has no effect: this model has no 3x3 convolutions LoRA can target")
    has_text_encoder = any(target.is_text_encoder for target, _ in layers)
    has_unet = any(not target.is_text_encoder for target, _ in layers)
    if options.loraplus_text_encoder_lr_ratio is not None and not has_text_encoder:
        raise UserError("--network_args loraplus_text_encoder_lr_ratio has no effect: no text encoder is trained")
    if options.loraplus_unet_lr_ratio is not None and not has_unet:
        raise UserError("--network_args loraplus_unet_lr_ratio has no effect: the denoiser is not trained")
    if options.uses_weight_adapters and any(target.save_format != "kohya" for target, _ in layers):
        raise UserError("the diffusers/PEFT LoRA file layout (--save_lora_format diffusers) holds only plain LoRA; "
                        "LoHa, LoKr and DoRA are saved in the kohya/LyCORIS layout: drop --save_lora_format")
