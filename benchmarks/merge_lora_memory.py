"""merge_lora on a full-size SDXL UNet: wall time against `cp` of the same file, and peak RssAnon.

Writes a synthetic SGM checkpoint with every tensor name and shape of SDXL base 1.0's UNet
(`model.diffusion_model.*`, 2.57 B parameters in fp16, 5.1 GB; shapes from diffusers'
UNet2DConditionModel built on the meta device with SDXL's published config), and a rank-16 kohya
LoRA on the attention and feed-forward linears of its transformer blocks (sd-scripts' SDXL
targets), then runs `tools/merge_lora.py --family sdxl` in a child process that samples its own
/proc/self/status (RssAnon, not ru_maxrss: the pages of a memory-mapped or cached file would
count there). All generated files are deleted at the end.

Run: python benchmarks/merge_lora_memory.py [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA_RANK = 16
FILL_BYTES = 64 << 20  # one random fp16 block, repeated through the file (contents do not matter)


def status_kib(field: str) -> int:
    """A /proc/self/status memory field (e.g. "RssAnon") in KiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakSampler:
    """Samples /proc/self/status RssAnon every `interval` s in a thread; `.peak_mib` after exit."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_kib, self.start_kib = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self.start_kib = self.peak_kib = status_kib("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    @property
    def added_mib(self) -> float:
        return (self.peak_kib - self.start_kib) / 1024


def sdxl_unet_meta():
    import torch
    from diffusers import UNet2DConditionModel

    from library.families.sdxl_lora_names import _sdxl_unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**_sdxl_unet_config())


def sdxl_checkpoint_shapes(unet) -> dict[str, tuple]:
    """`model.diffusion_model.<LDM name>` -> shape for every tensor of the UNet."""
    from library.models.sgm_layout import UNET_PREFIX, convert_sdxl_unet_to_ldm

    state = unet.state_dict()
    ldm = convert_sdxl_unet_to_ldm({key: key for key in state}, unet.config)
    return {UNET_PREFIX + ldm_key: tuple(state[key].shape) for ldm_key, key in ldm.items()}


def write_synthetic_checkpoint(path: str, shapes: dict[str, tuple], dtype: str = "F16") -> int:
    """Stream a safetensors file of these shapes (random fp16 data, repeated); returns its size."""
    import torch

    from library.safetensors_stream import OutputTensor, SafetensorsStreamWriter, tensor_bytes

    fill = tensor_bytes(torch.randn(FILL_BYTES // 2, generator=torch.Generator().manual_seed(0)).half())
    entries = [OutputTensor(name, dtype, shape) for name, shape in shapes.items()]
    with open(path, "wb") as f:
        writer = SafetensorsStreamWriter(f, entries, {"format": "pt"})
        for entry in entries:
            writer.fill_tensor(entry.name, fill)
        writer.close()
    return os.path.getsize(path)


def write_lora(path: str, linears: dict[str, tuple[int, int]], rank: int) -> int:
    """A kohya LoRA (fp16) with one module per (kohya name -> (out, in)); returns its size."""
    import torch

    from library.lora_formats import write_lora as save

    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (out_features, in_features) in linears.items():
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_features, generator=generator) * 0.01).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save(path, tensors, {"ss_network_dim": str(rank)}, "kohya")
    return os.path.getsize(path)


def sdxl_lora_linears(unet) -> dict[str, tuple[int, int]]:
    """sd-scripts' SDXL UNet targets: linears in Transformer2DModel blocks, named by LDM path."""
    from library.families.base import LoraTarget
    from library.models.sgm_layout import unet_lora_renames
    from networks.lora_modules import find_lora_layers

    renames = unet_lora_renames(unet)
    target = LoraTarget(prefix="lora_unet", root=unet, container_classes=("Transformer2DModel",),
                        rename=renames.__getitem__)
    found = find_lora_layers(target, with_conv3x3=False)
    return {target.file_name(layer.path): tuple(layer.layer.weight.shape[:2]) for layer in found}


def uniform_checkpoint_shapes(gigabytes: float, shape=(10240, 1280)) -> dict[str, tuple]:
    """SGM-named UNet linears of SDXL's largest linear shape (its feed-forward input), ~gigabytes in
    fp16: a quick stand-in for the full shape list (no diffusers needed)."""
    count = max(1, round(gigabytes * 1e9 / (math.prod(shape) * 2)))
    return {f"model.diffusion_model.input_blocks.{i}.1.transformer_blocks.0.ff.net.0.proj.weight": shape
            for i in range(count)}


def kohya_linears(shapes: dict[str, tuple]) -> dict[str, tuple[int, int]]:
    """One kohya SDXL module per UNet linear of `shapes` (sd-scripts names SDXL modules by LDM path)."""
    prefix = "model.diffusion_model."
    return {"lora_unet_" + name[len(prefix):-len(".weight")].replace(".", "_"): shape
            for name, shape in shapes.items() if len(shape) == 2}


def merge_in_child(model: str, lora: str, merged: str) -> tuple[float, dict]:
    """Run the merge in a fresh process measuring its own RssAnon; (wall seconds, its figures)."""
    seconds, result = timed([sys.executable, os.path.abspath(__file__), "--child", "--family", "sdxl",
                             "--model", model, "--loras", lora, "--save_to", merged])
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - start, result


def child_merge(argv: list[str]) -> None:
    """Run merge_lora in this process under the RssAnon sampler; print the figures as JSON."""
    from tools.merge_lora import merge_lora

    import torch  # noqa: F401  (imported before the baseline so the figure is the merge's own memory)

    with PeakSampler() as sampler:
        start = time.perf_counter()
        merge_lora(argv)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline_mib": sampler.start_kib / 1024, "peak_mib": sampler.peak_mib,
                      "added_mib": sampler.added_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the ~15 GB of files go")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child_merge(args.child)
    work = tempfile.mkdtemp(prefix="merge_lora_bench_", dir=args.dir)
    try:
        run(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(work: str) -> None:
    unet = sdxl_unet_meta()
    shapes = sdxl_checkpoint_shapes(unet)
    model, lora = os.path.join(work, "sdxl_unet.safetensors"), os.path.join(work, "lora.safetensors")
    start = time.perf_counter()
    size = write_synthetic_checkpoint(model, shapes)
    parameters = sum(math.prod(s) for s in shapes.values())
    print(f"synthetic SDXL UNet: {len(shapes)} tensors, {parameters / 1e9:.2f} B parameters, "
          f"{size / 1e9:.2f} GB fp16, written in {time.perf_counter() - start:.1f} s")
    linears = sdxl_lora_linears(unet)
    print(f"LoRA: {len(linears)} modules, rank {LORA_RANK}, {write_lora(lora, linears, LORA_RANK) / 1e6:.0f} MB")
    largest = max(shapes.values(), key=lambda s: math.prod(s))
    print(f"largest tensor: {largest} = {math.prod(largest) * 4 / 2**20:.0f} MiB in fp32")

    copy_seconds, _ = timed(["cp", model, os.path.join(work, "copy.safetensors")])
    os.remove(os.path.join(work, "copy.safetensors"))
    seconds, figures = merge_in_child(model, lora, os.path.join(work, "merged.safetensors"))
    print(f"cp of the checkpoint: {copy_seconds:.1f} s (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"merge_lora: {figures['seconds']:.1f} s inside the process ({seconds:.1f} s with start-up), "
          f"peak RssAnon {figures['peak_mib']:.0f} MiB ({figures['baseline_mib']:.0f} MiB after imports, "
          f"+{figures['added_mib']:.0f} MiB while merging)")


if __name__ == "__main__":
    main()
