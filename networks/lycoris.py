"""`--network_module lycoris.kohya`: LyCORIS' LoRA/LoCon, LoHa and LoKr (optionally with DoRA) for every family.

Users of sd-scripts train these with the lycoris-lora package (`--network_module lycoris.kohya
--network_args "algo=loha" "preset=full" "conv_dim=8" ...`); the same flags work here and write the
same file keys (`hada_w1_a`, `lokr_w1`, `lora_down`, `dora_scale`, `alpha` under kohya module names),
with `ss_network_module: lycoris.kohya` and the network_args in `ss_network_args`. The network is
networks.lora's `LoRANetwork` (same targets, names, optimizer groups and saving), built here from
LyCORIS' option names and defaults: `preset=full` (default) also trains the 3x3 convolutions of
families that have them, with conv_dim/conv_alpha defaulting to network_dim/network_alpha;
`preset=attn-mlp` leaves them out. Supported keys: algo (lora, locon, loha, lokr), preset, conv_dim,
conv_alpha, factor and decompose_both (LoKr), dora_wd, use_tucker (False only: the flat layout),
module_dropout, rank_dropout (algo lora only) and the LoRA+ ratios (algo lora only).
"""

from __future__ import annotations

from dataclasses import replace

from library.errors import UserError, did_you_mean
from library.families.base import LoraTarget
from networks.lora import LoRANetwork, LoRAOptions, build_network, check_weight_adapter_dropouts, parse_bool
from networks.lora import parse_lora_options as parse_networks_lora_options
from networks.lora_modules import find_lora_layers

NETWORK_MODULE_NAME = "lycoris.kohya"
ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
PRESETS = ("full", "attn-mlp")
SHARED_KEYS = ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
               "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")  # networks.lora reads these
LYCORIS_KEYS = ("algo", "preset", "factor", "decompose_both", "dora_wd", "use_tucker")


def _choice(key: str, text: str, choices) -> str:
    value = text.strip().lower()
    if value not in choices:
        raise UserError(f"--network_args {key}={text} is not supported{did_you_mean(value, choices)}; "
                        f"use one of {', '.join(choices)}")
    return value


def parse_lora_options(network_dim: int | None, network_alpha: float | None, network_dropout: float | None = None,
                       network_args: dict[str, str] | None = None) -> LoRAOptions:
    """LyCORIS' network_args validated into networks.lora's options; UserError naming a bad key or value."""
    network_args = dict(network_args or {})
    for key in network_args:
        if key not in SHARED_KEYS + LYCORIS_KEYS:
            raise UserError(f"--network_args: unknown key `{key}` for lycoris.kohya"
                            f"{did_you_mean(key, SHARED_KEYS + LYCORIS_KEYS)}; known keys: "
                            f"{', '.join(LYCORIS_KEYS + SHARED_KEYS)}")
    algo = ALGOS[_choice("algo", network_args.get("algo", "lora"), tuple(ALGOS))]
    preset = _choice("preset", network_args.get("preset", "full"), PRESETS)
    use_dora = parse_bool("dora_wd", network_args.get("dora_wd", "False"))
    if parse_bool("use_tucker", network_args.get("use_tucker", "False")):
        raise UserError("--network_args use_tucker=True is not supported: 3x3 convolutions use the flat layout "
                        "(hada_w1_b/lokr_w2_b of shape [rank, in*kh*kw]); drop use_tucker")
    _check_algo_keys(algo, network_args)
    if preset == "attn-mlp" and ("conv_dim" in network_args or "conv_alpha" in network_args):
        raise UserError("--network_args preset=attn-mlp leaves 3x3 convolutions out; drop conv_dim/conv_alpha "
                        "or use preset=full")
    shared = {k: v for k, v in network_args.items() if k in SHARED_KEYS}
    options = parse_networks_lora_options(network_dim, network_alpha, network_dropout, shared)
    if algo != "lora" or use_dora:
        check_weight_adapter_dropouts(f"algo={algo}" if algo != "lora" else "dora_wd",
                                      network_dropout, options.rank_dropout)
    return replace(options, network_args=network_args, algo=algo, use_dora=use_dora,
                   factor=_factor(network_args.get("factor", "-1")),
                   decompose_both=parse_bool("decompose_both", network_args.get("decompose_both", "False")),
                   network_module=NETWORK_MODULE_NAME)


def _factor(text: str) -> int:
    try:
        factor = int(text)
    except ValueError:
        factor = 0
    if factor == 0 or factor < -1:
        raise UserError(f"--network_args factor={text}: expected -1 (as square as possible) or a positive integer")
    return factor


def create_network(targets: list[LoraTarget], *, train_unet: bool = True, train_text_encoder: bool = True,
                   multiplier: float = 1.0, **option_flags) -> LoRANetwork:
    """The LyCORIS network on the targets' layers (not yet hooked in: call apply_to()); option_flags are
    parse_lora_options' network_dim, network_alpha, network_dropout and network_args."""
    options = parse_lora_options(**option_flags)
    preset = options.network_args.get("preset", "full").lower()
    if preset == "full" and options.conv_dim is None and _has_conv3x3(targets):
        options = replace(options, conv_dim=options.dim, conv_alpha=options.alpha)  # LyCORIS' defaults
    return build_network(targets, options, train_unet, train_text_encoder, multiplier)


def _has_conv3x3(targets: list[LoraTarget]) -> bool:
    return any(found.is_conv3x3 for target in targets for found in find_lora_layers(target, with_conv3x3=True))


def _check_algo_keys(algo: str, network_args: dict[str, str]) -> None:
    if algo != "lokr":
        for key in ("factor", "decompose_both"):
            if key in network_args:
                raise UserError(f"--network_args {key} applies to algo=lokr only; drop it for algo={algo}")
    if algo != "lora":
        for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if key in network_args:
                raise UserError(f"--network_args {key} scales LoRA's lora_up learning rate; algo={algo} has no "
                                "lora_up: drop it")
