"""Image-to-image for Lumina 2, for which diffusers has no pipeline: the Lumina2Pipeline started from a noised image.

With flow matching, img2img is a shortened run: the image's latent z0 = (mean of VAE(image) -
shift) * scale is mixed with noise, x = sigma * noise + (1 - sigma) * z0, at the first sigma of the
last int(steps * strength) steps of the usual schedule (the same resolution shift), and the pipeline
denoises from there (its `latents=` and `sigmas=` arguments), the way diffusers' FLUX and SD3
img2img pipelines work. The noise is drawn exactly as the txt2img pipeline draws it, so strength 1
gives the txt2img image of the same seed. Our own code: diffusers 0.42 ships no Lumina 2 img2img.
"""

from __future__ import annotations

import copy


class Lumina2Img2Img:
    """Wraps a diffusers Lumina2Pipeline; everything but the call is the wrapped pipeline's."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def __getattr__(self, name: str):
        return getattr(self.pipeline, name)

    def __call__(self, prompt, image, strength: float, num_inference_steps: int, generator, width: int, height: int,
                 **kwargs):
        import numpy as np
        import torch

        pipe = self.pipeline
        steps = int(num_inference_steps * strength)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)[num_inference_steps - steps:]
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        noise = pipe.prepare_latents(1, pipe.transformer.config.in_channels, height, width, dtype, device, generator)
        vae = pipe.vae
        parameter = next(vae.parameters())
        pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(parameter.device, parameter.dtype)
        with torch.no_grad():
            z0 = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        sigma = self._first_sigma(noise, sigmas)
        latents = sigma * noise + (1 - sigma) * z0.to(device=noise.device, dtype=noise.dtype)
        return pipe(prompt=prompt, latents=latents, sigmas=list(sigmas), num_inference_steps=steps,
                    generator=generator, width=width, height=height, **kwargs)

    def _first_sigma(self, noise, sigmas) -> float:
        """The first of `sigmas` after the scheduler's resolution shift (as the pipeline will set it)."""
        from diffusers.pipelines.lumina2.pipeline_lumina2 import calculate_shift

        scheduler = copy.deepcopy(self.pipeline.scheduler)
        config = scheduler.config
        mu = calculate_shift(noise.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=list(sigmas), device="cpu", mu=mu)
        return float(scheduler.sigmas[0])
