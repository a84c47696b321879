"""SD3's own `--network_args`: per-part ranks and block selection, as sd-scripts' networks/lora_sd3.py.

`context_attn_dim`, `context_mlp_dim`, `context_mod_dim`, `x_attn_dim`, `x_mlp_dim`, `x_mod_dim` set
the rank of one part of every joint block (attention q/k/v and output, both attentions of SD3.5's
dual-attention blocks included; the MLP; the adaLN modulation) on the context (text) or x (image)
side; 0 leaves that part out. `train_block_indices` ("all", "none", or indices and ranges like
"0-3,7") keeps LoRA on the chosen joint blocks only. sd-scripts' `emb_dims` (LoRA on the embedders
and final layer, outside the joint blocks) is refused with a clear message: the final layer's
modulation rows are ordered differently in SAI files and diffusers, so such files would not load
alike everywhere. Module names are the kohya ones of library/families/sd3_lora_names.py.
"""

from __future__ import annotations

import re
from typing import Optional

from library.errors import UserError
from networks.network_arguments import parse_block_selection

# key -> the name parts a module needs (sd-scripts' identifiers; `attn` also matches `attn2`)
PART_DIMS = {
    "context_attn_dim": ("context_block", "attn"), "context_mlp_dim": ("context_block", "mlp"),
    "context_mod_dim": ("context_block", "adaLN_modulation"), "x_attn_dim": ("x_block", "attn"),
    "x_mlp_dim": ("x_block", "mlp"), "x_mod_dim": ("x_block", "adaLN_modulation"),
}
SD3_NETWORK_ARGS = (*PART_DIMS, "train_block_indices", "emb_dims")
_JOINT_BLOCK = re.compile(r"lora_unet_joint_blocks_(\d+)_")


class SD3LoraSettings:
    """The SD3 --network_args, validated."""

    def __init__(self, given: dict[str, str]):
        self.given = dict(given)
        self.part_dims = {}
        for key in PART_DIMS:
            if key in given:
                if not given[key].strip().isdigit():
                    raise UserError(f"--network_args {key}={given[key]}: expected a rank (0 leaves those modules out)")
                self.part_dims[key] = int(given[key])
        self.blocks = parse_block_selection("train_block_indices", given["train_block_indices"]) \
            if "train_block_indices" in given else None
        if "emb_dims" in given and any(part.strip() not in ("", "0") for part in
                                       given["emb_dims"].strip().strip("[]").split(",")):
            raise UserError("--network_args emb_dims: LoRA on SD3's embedders and final layer is not supported; "
                            "use the per-part keys (context_attn_dim, x_mlp_dim, ...) for the joint blocks")

    def check_block_count(self, count: int) -> None:
        if self.blocks and max(self.blocks) >= count:
            raise UserError(f"--network_args train_block_indices: block {max(self.blocks)} does not exist "
                            f"(the model has {count} joint blocks, 0-{count - 1})")

    def module_rank(self, name: str) -> Optional[int]:
        """Rank of the transformer LoRA module `name`; None means --network_dim, 0 no module."""
        rank = next((self.part_dims[key] for key, marks in PART_DIMS.items()
                     if key in self.part_dims and all(mark in name for mark in marks)), None)
        match = _JOINT_BLOCK.match(name)
        if match and self.blocks is not None and int(match.group(1)) not in self.blocks:
            return 0
        return rank
