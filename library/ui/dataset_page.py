"""Dataset page: pick an image folder, see thumbnails with captions, edit or generate captions, set the
trigger word, repeats, resolution and buckets, and write the dataset TOML the CLI reads.

Captioning runs tools/caption_images.py (the same tool as on the command line) as a child process.
"""

import os
import subprocess
import sys

from library.ui.context import UIContext, shows_user_errors
from library.ui.dataset_files import (DatasetSettings, guess_caption_extension, list_images, write_caption,
                                      write_dataset_toml)
from library.ui.run_config import REPO_ROOT

THUMBNAIL_SIZE = 192
CAPTION_TOOL = os.path.join(REPO_ROOT, "tools", "caption_images.py")


def thumbnails(image_dir: str, caption_extension: str) -> tuple[list, list[str]]:
    """(gallery items: (thumbnail, caption), image paths). Thumbnails are PIL images, so any folder works."""
    from library.data.images import load_image

    items, paths = [], []
    for entry in list_images(image_dir, caption_extension):
        image = load_image(entry.image)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        caption = entry.caption if entry.caption is not None else "(no caption)"
        items.append((image, f"{os.path.basename(entry.image)}: {caption}"))
        paths.append(entry.image)
    return items, paths


def caption_command(image_dir: str, caption_extension: str, model: str, overwrite: bool) -> list[str]:
    """The tools/caption_images.py command: images without a caption file, or all of them (--overwrite)."""
    return [sys.executable, CAPTION_TOOL, image_dir, "--model", model.strip(), "--caption_extension",
            caption_extension, "--no-recursive", *(["--overwrite"] if overwrite else [])]


def run_caption_tool(image_dir: str, caption_extension: str, model: str, overwrite: bool) -> str:
    """Run tools/caption_images.py on the folder; returns the end of its output."""
    if not os.path.isfile(CAPTION_TOOL):
        return "captioning needs tools/caption_images.py, which this checkout does not have"
    command = caption_command(image_dir, caption_extension, model, overwrite)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    output = (result.stdout + result.stderr).strip().splitlines()
    return ("captioned" if result.returncode == 0 else f"captioning failed (exit code {result.returncode})") + \
        ":\n" + "\n".join(output[-8:])


def build(context: UIContext) -> dict:
    import gradio as gr

    with gr.Row():
        image_dir = gr.Textbox(label="Image folder", scale=4, elem_id="image_dir")
        caption_extension = gr.Textbox(label="Caption extension", value=".caption", scale=1, elem_id="caption_ext")
    with gr.Row():
        load = gr.Button("Load folder", elem_id="load_folder")
        demo = gr.Button("Use the demo images", elem_id="use_demo")
    paths = gr.State([])
    gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=260, elem_id="gallery",
                         allow_preview=False)
    with gr.Row():
        selected = gr.Textbox(label="Selected image", interactive=False, scale=2, elem_id="selected_image")
        caption = gr.Textbox(label="Caption", scale=4, elem_id="caption")
        save = gr.Button("Save caption", scale=1, elem_id="save_caption")
    with gr.Accordion("Caption with a model (tools/caption_images.py)", open=False):
        caption_model = gr.Textbox(label="Captioning model (local folder or hub id)",
                                   value="florence-community/Florence-2-large")
        with gr.Row():
            caption_missing = gr.Button("Caption images without a caption")
            caption_all = gr.Button("Caption all images (overwrite)")
    with gr.Row():
        trigger_word = gr.Textbox(label="Trigger word (replaces [trigger] in captions)", elem_id="trigger_word")
        repeats = gr.Number(label="Repeats", value=1, precision=0, minimum=1, elem_id="repeats")
        resolution = gr.Number(label="Resolution", value=512, precision=0, minimum=64, elem_id="resolution")
        batch_size = gr.Number(label="Batch size", value=1, precision=0, minimum=1)
    with gr.Row():
        enable_bucket = gr.Checkbox(label="Aspect-ratio buckets", value=True)
        min_bucket = gr.Number(label="Smallest bucket side", value=256, precision=0)
        max_bucket = gr.Number(label="Largest bucket side", value=1024, precision=0)
    with gr.Row():
        dataset_config = gr.Textbox(label="Dataset config file", value=context.default_dataset_config, scale=4,
                                    elem_id="dataset_config")
        write = gr.Button("Write dataset config", scale=1, elem_id="write_dataset")
    toml_view = gr.Code(label="Dataset config", language=None, elem_id="dataset_toml")
    status = gr.Markdown(elem_id="dataset_status")

    @shows_user_errors
    def load_folder(folder, extension):
        items, found = thumbnails(folder, extension)
        return items, found, "", "", f"{len(found)} images in {folder}"

    def use_demo():
        images, _ = context.write_demo()
        return images, guess_caption_extension(images), 5, 64, 64, 512

    @shows_user_errors
    def pick(found, extension, event: gr.SelectData):
        from library.data.captions import read_caption_file
        from library.ui.dataset_files import caption_path

        image = found[event.index]
        return image, read_caption_file(caption_path(image, extension)) or ""

    @shows_user_errors
    def save_caption(image, extension, text, folder):
        if not image:
            return gr.skip(), gr.skip(), "select an image first"
        path = write_caption(image, extension, text)
        items, found = thumbnails(folder, extension)
        return items, found, f"saved {path}"

    def caption_folder(overwrite):
        def handler(folder, extension, model):
            message = run_caption_tool(folder, extension, model, overwrite)
            items, found = thumbnails(folder, extension)
            return items, found, message
        return shows_user_errors(handler)

    @shows_user_errors
    def write_toml(folder, extension, trigger, count, size, batch, bucket, low, high, path):
        settings = DatasetSettings(folder, extension, count, trigger, size, batch, bucket, low, high)
        text = write_dataset_toml(settings, path)
        return text, f"wrote {path}"

    load_outputs = [gallery, paths, selected, caption, status]
    load.click(load_folder, [image_dir, caption_extension], load_outputs)
    demo.click(use_demo, None, [image_dir, caption_extension, repeats, resolution, min_bucket, max_bucket]).then(load_folder, [image_dir, caption_extension], load_outputs)
    gallery.select(pick, [paths, caption_extension], [selected, caption])
    save.click(save_caption, [selected, caption_extension, caption, image_dir], [gallery, paths, status])
    caption_missing.click(caption_folder(False), [image_dir, caption_extension, caption_model], [gallery, paths, status])
    caption_all.click(caption_folder(True), [image_dir, caption_extension, caption_model], [gallery, paths, status])
    write.click(write_toml, [image_dir, caption_extension, trigger_word, repeats, resolution, batch_size,
                             enable_bucket, min_bucket, max_bucket, dataset_config], [toml_view, status])
    return {"demo": demo, "dataset_config": dataset_config, "write": write}
