"""Plain dataclasses describing what a dataset config resolved to.

`library/config/dataset_config.py` turns a TOML/JSON file (sd-scripts' schema: [general],
[[datasets]], [[datasets.subsets]]) or the `--train_data_dir` folder convention into these, with
every cascading default already applied; `library/data/` builds datasets from them. Nothing here
reads files: these are the hand-over point between configuration and data loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CaptionOptions:
    """Everything that turns a caption file's text into the caption of one training step."""

    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    trigger_word: Optional[str] = None


@dataclass
class SubsetSpec:
    """One folder of images (DreamBooth style) or one metadata file (fine-tuning style)."""

    image_dir: Optional[str] = None
    metadata_file: Optional[str] = None
    class_tokens: Optional[str] = None
    caption_extension: str = ".caption"
    caption_from_path: bool = False
    num_repeats: int = 1
    is_reg: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    alpha_mask: bool = False
    conditioning_data_dir: Optional[str] = None  # loss masks (--masked_loss), named like the images
    resize_interpolation: Optional[str] = None  # None: box when shrinking, else lanczos
    captions: CaptionOptions = field(default_factory=CaptionOptions)

    @property
    def is_dreambooth(self) -> bool:
        return self.metadata_file is None

    @property
    def uses_loss_mask(self) -> bool:
        """Its images carry a loss mask: a conditioning_data_dir image, else the alpha channel."""
        return self.alpha_mask or self.conditioning_data_dir is not None


@dataclass
class DatasetSpec:
    """A group of subsets sharing resolution, batch size and bucketing."""

    subsets: list[SubsetSpec]
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0  # fraction of its images held out for validation loss (1.0: all)
    validation_seed: Optional[int] = None  # seed of that split (default: the training seed)
    is_validation: bool = False  # the whole dataset is validation data


@dataclass
class DatasetGroupSpec:
    """All datasets of one training run (multi-resolution training = several datasets)."""

    datasets: list[DatasetSpec]
    source: str = "<command line>"  # the config file path, for messages
