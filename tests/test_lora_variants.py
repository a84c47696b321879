"""LoHa, LoKr and DoRA (networks/weight_adapters.py, networks/lycoris.py, library/lora_deltas.py) against PEFT.

PEFT's LoHaLayer, LoKrLayer and DoRA LoRA layers are an implementation we did not write: our factors
are copied into them and their merged weight and output must equal ours. PEFT's DoRA normalises per
output row while LyCORIS/ComfyUI's `dora_scale` normalises per input column, so a Linear's DoRA is
checked through the transpose (PEFT on W^T with A = up^T, B = down^T gives W'^T); a convolution's
against the written-out formula. The file side (what merge and generate apply) must equal the
trained module's change.
"""

import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from library.errors import UserError
from library.families.base import LoraTarget
from library.lora_deltas import LohaWeights, LokrWeights, LoraPair, factorization
from library.lora_formats import read_lora
from networks import lycoris
from networks.lora import create_network
from networks.weight_adapters import DoRALoRAModule, LoHaModule, LoKrModule


def peft_layer(layer: nn.Module, config):
    from peft import get_peft_model

    model = get_peft_model(nn.Sequential(layer), config)
    return model, model.base_model.model[0]


def randomize_(module: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def layers():
    torch.manual_seed(0)
    return {"linear": nn.Linear(24, 40), "conv": nn.Conv2d(40, 16, 3, padding=1)}


def sample_input(layer):
    torch.manual_seed(1)
    return torch.randn(2, 5, 24) if isinstance(layer, nn.Linear) else torch.randn(2, 40, 6, 6)


def assert_hooked_output_equals(ours, layer, peft_model):
    """The layer with our module hooked in computes what PEFT's adapted model computes."""
    x = sample_input(layer)
    expected = peft_model(x)
    ours.attach()
    try:
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        ours.detach()


@pytest.mark.parametrize("dimension", list(range(1, 130)) + [320, 640, 768, 1280, 3072, 9216, 12288])
def test_factorization_equals_peft(dimension):
    """PEFT's copy of LyCORIS' factorization, except that LyCORIS (and we) order a dividing factor's pair
    smaller first, as in every other case."""
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for factor in (-1, 2, 3, 4, 8, 16):
        assert factorization(dimension, factor) == tuple(sorted(peft_factorization(dimension, factor))), factor


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_loha_equals_peft_loha(kind):
    from peft import LoHaConfig

    layer = layers()[kind]
    ours = LoHaModule("m", [layer], rank=2, alpha=3.0)
    randomize_(ours)
    model, theirs = peft_layer(layer, LoHaConfig(r=2, alpha=3.0, target_modules=["0"]))
    with torch.no_grad():
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            getattr(theirs, name)["default"].copy_(getattr(ours, name))
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    assert_hooked_output_equals(ours, layer, model)


@pytest.mark.parametrize("kind,decompose_both,rank", [("linear", False, 2), ("linear", True, 1), ("conv", False, 1),
                                                      ("linear", False, 8)])
def test_lokr_equals_peft_lokr(kind, decompose_both, rank):
    from peft import LoKrConfig

    layer = layers()[kind]
    ours = LoKrModule("m", [layer], rank=rank, alpha=3.0, decompose_both=decompose_both)
    randomize_(ours)
    full = not (ours.w1_factored or ours.w2_factored)
    model, theirs = peft_layer(layer, LoKrConfig(r=rank, alpha=rank if full else 3.0, target_modules=["0"],
                                                 decompose_both=decompose_both, decompose_factor=-1))
    peft_names = {n.split(".")[0] for n, p in theirs.named_parameters() if "lokr" in n}
    assert peft_names == {n for n, _ in ours.named_parameters()}  # same factorization, same low-rank choices
    with torch.no_grad():
        for name in peft_names:
            getattr(theirs, name)["default"].copy_(getattr(ours, name).reshape(getattr(theirs, name)["default"].shape))
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    assert_hooked_output_equals(ours, layer, model)


def test_linear_dora_equals_peft_dora_on_the_transpose():
    from peft import LoraConfig

    layer = layers()["linear"]
    ours = DoRALoRAModule("m", [layer], rank=2, alpha=3.0)
    randomize_(ours)
    with torch.no_grad():
        ours.dora_scale.add_(1.0)  # away from its start (which leaves W unchanged)
    transposed = nn.Linear(40, 24, bias=False)
    with torch.no_grad():
        transposed.weight.copy_(layer.weight.T)
    _, theirs = peft_layer(transposed, LoraConfig(r=2, lora_alpha=3.0, target_modules=["0"], use_dora=True))
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_up.weight.T)
        theirs.lora_B["default"].weight.copy_(ours.lora_down.weight.T)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.dora_scale[0])
    theirs.merge()
    torch.testing.assert_close(layer.weight + ours.delta_weight(), theirs.get_base_layer().weight.T,
                               rtol=1e-5, atol=1e-5)


def test_conv_dora_equals_the_formula_and_starts_at_w():
    layer = layers()["conv"]
    ours = LoHaModule("m", [layer], rank=2, alpha=3.0, use_dora=True)
    assert ours.dora_scale.shape == (1, 40, 1, 1)
    randomize_(ours)  # hada_w2_a is no longer zero, so W + delta != W
    with torch.no_grad():
        ours.dora_scale.copy_(ours.dora_scale.abs() + 0.5)
    changed = layer.weight.detach() + ours.unscaled_delta().detach() * 1.5
    expected = torch.empty_like(changed)
    for channel in range(40):  # per input channel: its slice over every output and kernel position
        column = changed[:, channel]
        expected[:, channel] = column * ours.dora_scale[0, channel, 0, 0] / column.norm()
    torch.testing.assert_close(layer.weight + ours.delta_weight(), expected, rtol=1e-5, atol=1e-5)
    fresh = DoRALoRAModule("m", [layer], rank=2, alpha=3.0)  # lora_up = 0: W' = W
    torch.testing.assert_close(fresh.delta_weight(), torch.zeros_like(layer.weight), rtol=0, atol=1e-6)


def fused_targets(root: nn.Module) -> list[LoraTarget]:
    """A FLUX-like block: q, k and v read one input and are one fused `qkv` module in files."""
    return [LoraTarget("lora_unet", root, ("Block",), fused_groups={"Block": (("q", "k", "v"),)},
                       rename=lambda path: path.replace("q", "qkv"))]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1))


@pytest.mark.parametrize("network_args", [{"algo": "loha", "dora_wd": "True"}, {"algo": "lokr", "factor": "4"},
                                          {"algo": "lora", "dora_wd": "True"}])
def test_fused_module_change_is_the_file_change_and_the_hooked_output(network_args, tmp_path):
    torch.manual_seed(0)
    root = nn.Sequential(Block())
    network = lycoris.create_network(fused_targets(root), network_dim=2, network_alpha=1.0, network_args=network_args)
    randomize_(network)
    x = torch.randn(3, 8)
    block = root[0]
    fused = torch.cat([block.q.weight, block.k.weight, block.v.weight]).detach()
    path = str(tmp_path / "fused.safetensors")
    network.save_weights(path, None, {})
    pairs = read_lora(path).modules
    assert set(pairs) == {"lora_unet_0_qkv", "lora_unet_0_out"}
    module = network.modules_by_name["lora_unet_0_qkv"]
    change = pairs["lora_unet_0_qkv"].weight_change(fused, fused.shape, 1.0, "qkv")
    torch.testing.assert_close(change, module.delta_weight(), rtol=1e-5, atol=1e-6)
    new = fused + change
    out_change = pairs["lora_unet_0_out"].weight_change(block.out.weight.detach(), block.out.weight.shape, 1.0, "out")
    expected = nn.functional.linear(torch.cat([nn.functional.linear(x, new[:8], block.q.bias),
                                               nn.functional.linear(x, new[8:12], block.k.bias),
                                               nn.functional.linear(x, new[12:], block.v.bias)], dim=-1),
                                    block.out.weight + out_change, block.out.bias)
    network.apply_to()
    try:
        torch.testing.assert_close(root(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        network.remove()


def test_weight_holders_read_from_files_are_the_right_kinds(tmp_path):
    torch.manual_seed(0)
    root = nn.Sequential(Block())
    kinds = {}
    for algo, dora in (("loha", "False"), ("lokr", "True"), ("lora", "True")):
        network = lycoris.create_network(fused_targets(root), network_dim=2, network_alpha=1.0,
                                         network_args={"algo": algo, "dora_wd": dora})
        path = str(tmp_path / f"{algo}.safetensors")
        network.save_weights(path, torch.float16, {})
        pair = read_lora(path).modules["lora_unet_0_out"]
        kinds[algo] = (type(pair), pair.dora_scale is not None, load_file(path)["lora_unet_0_out.alpha"].dtype)
    assert kinds == {"loha": (LohaWeights, False, torch.float16), "lokr": (LokrWeights, True, torch.float16),
                     "lora": (LoraPair, True, torch.float16)}


@pytest.mark.parametrize("module,args,message", [
    ("lycoris", {"algo": "lohaa"}, "algo=lohaa is not supported (did you mean `loha`?)"),
    ("lycoris", {"algo": "loha", "factor": "4"}, "factor applies to algo=lokr only"),
    ("lycoris", {"algo": "loha", "rank_dropout": "0.1"}, "rank_dropout does not apply with algo=loha"),
    ("lycoris", {"algo": "lokr", "loraplus_lr_ratio": "4"}, "algo=lokr has no lora_up"),
    ("lycoris", {"algo": "loha", "use_tucker": "True"}, "use_tucker=True is not supported"),
    ("lycoris", {"algo": "lokr", "factor": "0"}, "factor=0: expected -1"),
    ("lycoris", {"preset": "attn-mlp", "conv_dim": "4"}, "preset=attn-mlp leaves 3x3 convolutions out"),
    ("lycoris", {"algoo": "loha"}, "unknown key `algoo` for lycoris.kohya (did you mean `algo`?)"),
    ("lycoris", {"dora_wd": "maybe"}, "dora_wd=maybe: expected True or False"),
    ("lora", {"use_dora": "True", "rank_dropout": "0.1"}, "rank_dropout does not apply with use_dora"),
    ("lora", {"use_dorа": "True"}, "unknown key"),
])
def test_bad_combinations_are_refused_in_one_line(module, args, message):
    from networks import lora

    parse = lycoris.parse_lora_options if module == "lycoris" else lora.parse_lora_options
    with pytest.raises(UserError, match=re.escape(message)) as error:
        parse(4, 1.0, None, args)
    assert "\n" not in str(error.value)


def test_network_dropout_is_refused_with_dora():
    from networks import lora

    with pytest.raises(UserError, match="--network_dropout does not apply with use_dora"):
        lora.parse_lora_options(4, 1.0, 0.1, {"use_dora": "true"})


def test_diffusers_save_format_is_refused_for_weight_adapters():
    root = nn.Sequential(Block())
    target = LoraTarget("lora_unet", root, ("Block",), save_format="diffusers", diffusers_prefix="transformer")
    with pytest.raises(UserError, match="holds only plain LoRA"):
        create_network([target], network_dim=2, network_alpha=1.0, network_args={"use_dora": "True"})
