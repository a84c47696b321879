"""The built-in demo the quickstart trains on: a tiny SD1.5-layout model and generated images.

Nothing is downloaded: the model is randomly initialised with the real SD1.5 block layout
(library/tiny_models/sd.py) and the images are simple drawn shapes with matching captions, laid out in
sd-scripts' `N_class tokens/` folder convention so the quickstart exercises the real data path.
"""

from __future__ import annotations

import os

SHAPES = [
    ("red", (220, 40, 40), "circle"),
    ("blue", (40, 60, 220), "square"),
    ("green", (40, 180, 70), "triangle"),
    ("yellow", (230, 210, 40), "circle"),
    ("purple", (140, 50, 170), "square"),
    ("orange", (240, 140, 30), "triangle"),
]


def draw_shape(color: tuple[int, int, int], shape: str, size: int = 64):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
    return image


def write_demo_images(folder: str, repeats: int = 5) -> str:
    """Writes the demo images and captions under `folder/<repeats>_shape/`; returns `folder`."""
    subset = os.path.join(folder, f"{repeats}_shape")
    os.makedirs(subset, exist_ok=True)
    for index, (color_name, color, shape) in enumerate(SHAPES):
        stem = os.path.join(subset, f"{index:02d}_{color_name}_{shape}")
        draw_shape(color, shape).save(stem + ".png")
        with open(stem + ".caption", "w", encoding="utf-8") as f:
            f.write(f"a {color_name} {shape}, flat drawing\n")
    return folder


def write_demo_model(folder: str) -> str:
    from library.tiny_models.sd import save_tiny_sd15_pipeline

    if not os.path.exists(os.path.join(folder, "model_index.json")):
        save_tiny_sd15_pipeline(folder)
    return folder
