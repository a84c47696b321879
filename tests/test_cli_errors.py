"""Bad input through the real entry points: one clear message and exit code 2, or a warned skip.

The list the foundation issue asks for: corrupt image, zero-byte image, image without caption,
non-UTF-8 caption, empty dataset, TOML syntax error, wrong value type, missing model file, and a
FLUX checkpoint given to the SD script.
"""

import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_script
from library.cli import run_training


def base_args(model, output_dir, *data_args):
    return ["--pretrained_model_name_or_path", str(model), *data_args, "--resolution", "64",
            "--output_dir", str(output_dir), "--max_train_steps", "1", "--network_dim", "2"]


def user_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_training("sd", "network", argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_subprocess_user_error_exits_2_without_traceback(demo_image_root, tmp_path):
    result = run_script("sd_train_network.py", *base_args(tmp_path / "missing.safetensors", tmp_path / "out",
                                                          "--train_data_dir", demo_image_root))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing.safetensors" in result.stderr


def test_help_lists_sd_scripts_flags():
    result = run_script("sd_train_network.py", "--help")
    assert result.returncode == 0
    for flag in ("--network_dim", "--dataset_config", "--cache_latents_to_disk", "--min_snr_gamma", "--clip_skip"):
        assert flag in result.stdout


def test_missing_model_file(capsys, demo_image_root, tmp_path):
    message = user_error(capsys, base_args(tmp_path / "nope.safetensors", tmp_path / "out",
                                           "--train_data_dir", demo_image_root))
    assert "nope.safetensors" in message


def test_flux_checkpoint_given_to_sd_script(capsys, demo_image_root, tmp_path):
    flux = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
               "single_blocks.0.linear1.weight": torch.zeros(4, 2)}, str(flux))
    message = user_error(capsys, base_args(flux, tmp_path / "out", "--train_data_dir", demo_image_root))
    assert "FLUX" in message and "flux_train_network.py" in message


def test_toml_syntax_error(capsys, tiny_sd15_folder, tmp_path):
    config = tmp_path / "ds.toml"
    config.write_text("[general]\nresolution = \n")
    message = user_error(capsys, base_args(tiny_sd15_folder, tmp_path / "out", "--dataset_config", str(config)))
    assert str(config) in message and "line 2" in message


def test_wrong_value_type_and_misspelled_key(capsys, tiny_sd15_folder, demo_image_root, tmp_path):
    config = tmp_path / "ds.toml"
    config.write_text(f"[[datasets]]\nbatch_size = 'two'\n[[datasets.subsets]]\nimage_dir = '{demo_image_root}'\n")
    message = user_error(capsys, base_args(tiny_sd15_folder, tmp_path / "out", "--dataset_config", str(config)))
    assert "datasets[0].batch_size" in message and "'two'" in message
    config.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{demo_image_root}'\nnum_repeat = 2\n")
    message = user_error(capsys, base_args(tiny_sd15_folder, tmp_path / "out", "--dataset_config", str(config)))
    assert "num_repeat" in message and "num_repeats" in message


def test_empty_dataset(capsys, tiny_sd15_folder, tmp_path):
    (tmp_path / "images" / "5_dog").mkdir(parents=True)
    message = user_error(capsys, base_args(tiny_sd15_folder, tmp_path / "out",
                                           "--train_data_dir", str(tmp_path / "images")))
    assert "no usable training images" in message and "5_dog" in message


def test_bad_images_and_captions_are_skipped_with_warnings(caplog, tiny_sd15_folder, demo_image_root, tmp_path):
    folder = os.path.join(demo_image_root, "1_shape")
    with open(os.path.join(folder, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nthis is not an image")
    open(os.path.join(folder, "zero.png"), "wb").close()
    with open(os.path.join(folder, "00_red_circle.caption"), "wb") as f:
        f.write("a r\xe9d circle".encode("latin-1"))  # not UTF-8: that image is skipped
    os.remove(os.path.join(folder, "01_blue_square.caption"))  # no caption: trains on the class tokens
    with caplog.at_level(logging.WARNING):
        run_training("sd", "network", base_args(tiny_sd15_folder, tmp_path / "out", "--train_data_dir",
                                                demo_image_root, "--output_name", "lora"))
    log = caplog.text
    assert "corrupt.png" in log and "zero.png" in log and "00_red_circle.caption" in log
    assert "01_blue_square.png" in log  # warned that it has no caption file
    assert "skipped 3 images" in log
    assert (tmp_path / "out" / "lora.safetensors").is_file()


# ---- the bad-input catalogue: each exits 2 with one clear line, and the output folder is untouched ----

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _catalogue(tmp, images, model):
    """(name, extra argv replacing/adding to the base command, text the error must contain)."""
    not_a_folder = _write(tmp / "plain_file", "x")
    bad_lora = tmp / "other_family_lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}, str(bad_lora))
    broken_json = _write(tmp / "meta.json", "{not json")
    random_crop = _write(tmp / "crop.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{images}/1_shape'\n"
                                            "random_crop = true\n")
    sd_scripts_state = tmp / "sd_scripts-state"
    sd_scripts_state.mkdir()
    _write(sd_scripts_state / "train_state.json", '{"current_epoch": 1, "current_step": 3}')
    return [
        ("state folder of another trainer", ["--resume", str(sd_scripts_state)], "another trainer"),
        ("log prefix without logging", ["--log_prefix", "run1"], "--logging_dir"),
        ("cache folder without disk caching", ["--latents_cache_dir", str(tmp / "cache")], "--cache_latents_to_disk"),
        ("output folder is a file", ["--output_dir", f"{not_a_folder}/out"], "plain_file"),
        ("unknown optimizer", ["--optimizer_type", "AdamWW"], "AdamW"),
        ("missing network module", ["--network_module", "networks.nope"], "networks.nope"),
        ("max_token_length", ["--max_token_length", "100"], "75, 150 or 225"),
        ("full_fp16 without fp16", ["--full_fp16"], "--mixed_precision fp16"),
        ("resume folder missing", ["--resume", str(tmp / "no-state")], "no-state"),
        ("network_weights of another family", ["--network_weights", str(bad_lora)], "other_family_lora"),
        ("bad resolution", ["--resolution", "abc"], "resolution"),
        ("missing vae", ["--vae", str(tmp / "vae.safetensors")], "vae.safetensors"),
        ("caching with random_crop", ["--dataset_config", random_crop, "--cache_latents"], "random_crop"),
        ("broken metadata file", ["--dataset_config", _write(tmp / "ft.toml", "[[datasets]]\n[[datasets.subsets]]\n"
                                                             f"metadata_file = '{broken_json}'\n")], "meta.json"),
        ("unknown network arg", ["--network_args", "conv_dimm=4"], "conv_dim"),
        ("negative steps", ["--max_train_steps", "0"], "--max_train_steps"),
        ("config file with a typo", ["--config_file", _write(tmp / "args.toml", "learning_rat = 1e-4\n")],
         "learning_rate"),
        ("text cache while training the text encoder", ["--cache_text_encoder_outputs", "--keep_te"],
         "cannot train the text encoders"),
    ]


def _argv(base, extra):
    """The base command with `extra` flags replacing same-named ones (folder flags swapped for a config)."""
    args = list(base)
    if "--keep_te" in extra:
        extra = [a for a in extra if a != "--keep_te"]
    else:
        args.append("--network_train_unet_only")
    if "--dataset_config" in extra:
        at = args.index("--train_data_dir")
        del args[at:at + 2]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args and value and not value.startswith("--"):
            at = args.index(flag)
            args[at + 1] = value
        else:
            args.extend([flag, value] if value and not value.startswith("--") else [flag])
    for flag in extra:
        if flag.startswith("--") and flag not in args:
            args.append(flag)
    return args


def test_bad_input_catalogue(capsys, tiny_sd15_folder, demo_image_root, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    keep = output / "earlier_lora.safetensors"
    keep.write_bytes(b"an earlier result the user keeps")
    base = base_args(tiny_sd15_folder, output, "--train_data_dir", demo_image_root)
    cases = _catalogue(tmp_path, demo_image_root, tiny_sd15_folder)
    assert len(cases) + 9 >= 20  # with the nine tests above: at least 20 bad inputs
    for name, extra, expected in cases:
        message = user_error(capsys, _argv(base, extra))
        assert expected in message, f"{name}: {message}"
        assert keep.read_bytes() == b"an earlier result the user keeps", name
        assert sorted(os.listdir(output)) == ["earlier_lora.safetensors"], name


def test_full_disk_keeps_the_previous_file(capsys, monkeypatch, tiny_sd15_folder, demo_image_root, tmp_path):
    import errno

    import safetensors.torch

    output = tmp_path / "out"
    output.mkdir()
    previous = output / "lora.safetensors"
    previous.write_bytes(b"previous lora")

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    message = user_error(capsys, base_args(tiny_sd15_folder, output, "--train_data_dir", demo_image_root,
                                           "--output_name", "lora"))
    assert "disk is full" in message and "lora.safetensors" in message
    assert previous.read_bytes() == b"previous lora"
    assert sorted(os.listdir(output)) == ["lora.safetensors"]  # no temp file left behind
