"""Which attention kernels the denoiser uses: sd-scripts' --xformers (also --diffusers_xformers).

By default diffusers' attention runs on PyTorch's scaled_dot_product_attention, which picks flash or
memory-efficient kernels itself (so sd-scripts' --sdpa and --mem_eff_attn select what already
happens; library/config/sd_scripts_compat.py accepts them). `--xformers` switches the denoiser to
xformers' memory_efficient_attention through diffusers' `enable_xformers_memory_efficient_attention`
when the package is installed, the model runs on CUDA and diffusers has an xformers version of each of
the model's attention processors (UNets, SD3's joint attention, FLUX's dispatcher-based attention;
not Lumina 2's, which diffusers would silently replace by a plain one without its rotary embedding);
otherwise one warning says SDPA is used.
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)


def add_attention_arguments(parser) -> None:
    group = parser.add_argument_group("attention")
    group.add_argument("--xformers", "--diffusers_xformers", dest="xformers", action="store_true",
                       help="use xformers attention in the denoiser when the package is installed (else PyTorch SDPA)")


def apply_attention_backend(args, denoiser, device) -> str:
    """Switch `denoiser` to xformers when asked and possible; returns the backend in use ("xformers" or "sdpa")."""
    if not args.xformers:
        return "sdpa"
    reason = _processors_without_xformers(denoiser) or _xformers_unavailable(device)
    if reason is None:
        try:
            denoiser.enable_xformers_memory_efficient_attention()
            logger.info("--xformers: the denoiser's attention runs on xformers' memory_efficient_attention")
            return "xformers"
        except (ValueError, NotImplementedError, ImportError, AttributeError) as error:
            reason = f"diffusers could not switch this model to xformers ({error})"
    logger.warning("--xformers: %s; attention runs on PyTorch's scaled_dot_product_attention instead "
                   "(memory-efficient as well)", reason)
    return "sdpa"


def _processors_without_xformers(denoiser) -> str | None:
    """Why diffusers' xformers switch would change what the model computes, or None when it is safe."""
    from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,
                                                      JointAttnProcessor2_0)

    convertible = (AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0)
    others = sorted({type(module.processor).__name__ for module in denoiser.modules()
                     if isinstance(module, Attention) and not isinstance(module.processor, convertible)})
    if others:
        return f"diffusers has no xformers version of this model's attention ({', '.join(others)})"
    return None


def _xformers_unavailable(device) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "the xformers package is not installed"
    if getattr(device, "type", str(device)) != "cuda":
        return "xformers needs a CUDA device"
    return None
