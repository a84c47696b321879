"""Tiny randomly initialised models, one module per family, for tests, benchmarks and the demos.

Each has the real checkpoint's module names and block layout at a few dozen channels, so LoRA key
names, checkpoint converters and the training loop run for real on a CPU in well under a second
per step. Nothing is downloaded: tokenizers are the bundled CLIP BPE or small sentencepiece models
trained on the fly. `sd` (SD 1.5 layout), `sdxl`, `flux`, `sd3` (SD3 and SD3.5-medium layouts),
`lumina`; each writes a diffusers folder (`save_tiny_<family>_pipeline`) and the newer families also
the single files users download.
"""
