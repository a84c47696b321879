"""Dataset configuration: sd-scripts' TOML/JSON schema, cascading defaults, the --train_data_dir
folder convention, and the errors users get for mistakes (file, key path, nearest valid key)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path

import pytest

from library.config import dataset_config
from library.config.config_file import load_toml
from library.config.dataset_args import add_dataset_arguments, parse_resolution
from library.config.dataset_config import load_dataset_group
from library.config.dataset_spec import CaptionOptions, DatasetGroupSpec, DatasetSpec, SubsetSpec
from library.errors import UserError

FIXTURES = Path(__file__).parent / "data" / "config"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args([str(arg) for arg in argv])


def make_dirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load_file(path: Path, *extra: str) -> DatasetGroupSpec:
    return load_dataset_group(parse("--dataset_config", path, *extra))


def error_of(path: Path, *extra: str) -> str:
    with pytest.raises(UserError) as caught:
        load_file(path, *extra)
    return str(caught.value)


def one_subset(subset_lines: str, dataset_lines: str = "") -> str:
    return f"[[datasets]]\n{dataset_lines}\n[[datasets.subsets]]\n{subset_lines}\n"


def fixture_config(tmp_path: Path, name: str) -> Path:
    text = (FIXTURES / name).read_text(encoding="utf-8").replace("@ROOT@", tmp_path.as_posix())
    return write(tmp_path / name, text)


# --- sd-scripts' documented examples load ---

def test_sd_scripts_documented_example_loads_with_cascading(tmp_path):
    make_dirs(tmp_path, "hoge", "fuga", "reg", "piyo")
    write(tmp_path / "piyo" / "piyo_md.json", "{}")
    group = load_file(fixture_config(tmp_path, "sd_scripts_example.toml"))

    def dreambooth(folder, tokens, keep, is_reg=False):
        return SubsetSpec(image_dir=str(tmp_path / folder), class_tokens=tokens, caption_extension=".txt",
                          is_reg=is_reg, captions=CaptionOptions(shuffle_caption=True, keep_tokens=keep))

    fine_tuning = SubsetSpec(image_dir=str(tmp_path / "piyo"), metadata_file=str(tmp_path / "piyo" / "piyo_md.json"),
                             captions=CaptionOptions(shuffle_caption=True, keep_tokens=1))
    assert group == DatasetGroupSpec(
        datasets=[
            DatasetSpec(subsets=[dreambooth("hoge", "hoge girl", 2), dreambooth("fuga", "fuga boy", 3),
                                 dreambooth("reg", "human", 1, is_reg=True)],
                        resolution=(512, 512), batch_size=4),
            DatasetSpec(subsets=[fine_tuning], resolution=(768, 768), batch_size=2),
        ],
        source=str(tmp_path / "sd_scripts_example.toml"),
    )
    assert group.datasets[1].subsets[0].is_dreambooth is False


def test_sd_scripts_separator_example_loads(tmp_path):
    make_dirs(tmp_path, "image_dir")
    group = load_file(fixture_config(tmp_path, "sd_scripts_separator_example.toml"))
    captions = CaptionOptions(
        caption_prefix="1girl, hatsune miku, vocaloid |||",
        caption_suffix=", anime screencap ||| masterpiece, rating: general",
        shuffle_caption=True, keep_tokens_separator="|||", secondary_separator=";;;", enable_wildcard=True,
        caption_tag_dropout_rate=0.1,
    )
    subset = SubsetSpec(image_dir=str(tmp_path / "image_dir"), caption_extension=".txt", flip_aug=True,
                        captions=captions)
    assert group.datasets == [DatasetSpec(subsets=[subset], resolution=(1024, 1024), batch_size=6,
                                          enable_bucket=True, bucket_no_upscale=True)]


# --- exact specs ---

CASCADE_TOML = """
[general]
caption_extension = ".txt"
flip_aug = true
num_repeats = 2
resolution = 640
trigger_word = "sks"
caption_dropout_rate = 0
enable_bucket = true
min_bucket_reso = 320

[[datasets]]
batch_size = 3
resolution = [640, 512]
num_repeats = 5
caption_prefix = "photo, "

  [[datasets.subsets]]
  image_dir = "{root}/a"
  num_repeats = 7
  flip_aug = false
  caption_from_path = true
  alpha_mask = true
  token_warmup_step = 10

  [[datasets.subsets]]
  image_dir = "{root}/b"
  is_reg = true
  class_tokens = "dog"

[[datasets]]
bucket_reso_steps = 32
max_bucket_reso = 640

  [[datasets.subsets]]
  image_dir = "{root}/a"
  caption_prefix = "x "
"""


def expected_cascade(root: Path, source: str) -> DatasetGroupSpec:
    first = SubsetSpec(image_dir=f"{root}/a", caption_extension=".txt", caption_from_path=True, num_repeats=7,
                       alpha_mask=True, captions=CaptionOptions(caption_prefix="photo, ", trigger_word="sks",
                                                                token_warmup_step=10.0))
    second = SubsetSpec(image_dir=f"{root}/b", caption_extension=".txt", num_repeats=5, is_reg=True, flip_aug=True,
                        class_tokens="dog", captions=CaptionOptions(caption_prefix="photo, ", trigger_word="sks"))
    third = SubsetSpec(image_dir=f"{root}/a", caption_extension=".txt", num_repeats=2, flip_aug=True,
                       captions=CaptionOptions(caption_prefix="x ", trigger_word="sks"))
    return DatasetGroupSpec(
        datasets=[
            DatasetSpec(subsets=[first, second], resolution=(640, 512), batch_size=3, enable_bucket=True,
                        min_bucket_reso=320),
            DatasetSpec(subsets=[third], resolution=(640, 640), enable_bucket=True, min_bucket_reso=320,
                        max_bucket_reso=640, bucket_reso_steps=32),
        ],
        source=source,
    )


def test_cascading_subset_over_dataset_over_general_over_default(tmp_path):
    make_dirs(tmp_path, "a", "b")
    path = write(tmp_path / "ds.toml", CASCADE_TOML.format(root=tmp_path.as_posix()))
    group = load_file(path)
    assert group == expected_cascade(tmp_path, str(path))
    assert isinstance(group.datasets[0].subsets[0].captions.token_warmup_step, float)
    assert isinstance(group.datasets[0].subsets[0].captions.caption_dropout_rate, float)


def test_json_config_gives_the_same_specs_as_toml(tmp_path):
    make_dirs(tmp_path, "a", "b")
    document = load_toml(write(tmp_path / "ds.toml", CASCADE_TOML.format(root=tmp_path.as_posix())))
    path = write(tmp_path / "ds.json", json.dumps(document, indent=2))
    assert load_file(path) == expected_cascade(tmp_path, str(path))


def test_train_data_dir_convention_with_cli_options(tmp_path, caplog):
    train, reg = tmp_path / "train", tmp_path / "reg"
    make_dirs(train, "10_sks dog", "2_red_toy", "misc", "0_never")
    make_dirs(reg, "1_dog")
    write(train / "loose.png", "")
    with caplog.at_level(logging.WARNING):
        group = load_dataset_group(parse("--train_data_dir", train, "--reg_data_dir", reg, "--resolution", "64,32",
                                         "--train_batch_size", "2", "--shuffle_caption", "--keep_tokens", "1",
                                         "--caption_extension", ".txt", "--enable_bucket", "--min_bucket_reso", "32",
                                         "--trigger_word", "sks", "--caption_from_path"))
    captions = CaptionOptions(shuffle_caption=True, keep_tokens=1, trigger_word="sks")

    def subset(folder, repeats, tokens, is_reg=False):
        return SubsetSpec(image_dir=str(folder), num_repeats=repeats, class_tokens=tokens, is_reg=is_reg,
                          caption_extension=".txt", caption_from_path=True, captions=captions)

    assert group == DatasetGroupSpec(datasets=[DatasetSpec(
        subsets=[subset(train / "10_sks dog", 10, "sks dog"), subset(train / "2_red_toy", 2, "red_toy"),
                 subset(reg / "1_dog", 1, "dog", is_reg=True)],
        resolution=(64, 32), batch_size=2, enable_bucket=True, min_bucket_reso=32)])
    skipped = [record.getMessage() for record in caplog.records if "skipping folder" in record.getMessage()]
    assert len(skipped) == 2 and "0_never" in skipped[0] and "misc" in skipped[1]


def test_train_data_dir_without_flags_uses_built_in_defaults(tmp_path):
    make_dirs(tmp_path, "3_cat")
    group = load_dataset_group(parse("--train_data_dir", tmp_path))
    assert group.datasets == [DatasetSpec(subsets=[SubsetSpec(image_dir=str(tmp_path / "3_cat"), num_repeats=3,
                                                               class_tokens="cat")])]
    assert group.source == "<command line>"


def test_duplicate_folder_in_one_dataset_is_used_once_with_a_warning(tmp_path, caplog):
    make_dirs(tmp_path, "a")
    path = write(tmp_path / "ds.toml", f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path.as_posix()}/a"
  [[datasets.subsets]]
  image_dir = "{tmp_path.as_posix()}/a/"
  flip_aug = true
""")
    with caplog.at_level(logging.WARNING):
        group = load_file(path)
    assert [subset.flip_aug for subset in group.datasets[0].subsets] == [False]
    assert "datasets[0].subsets[1] repeats an earlier subset" in caplog.text


# --- errors name the file, the key path and the fix ---

def test_misspelled_key_names_path_and_nearest_key(tmp_path):
    make_dirs(tmp_path, "a")
    path = write(tmp_path / "ds.toml", f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path.as_posix()}/a"
  [[datasets.subsets]]
  image_dir = "{tmp_path.as_posix()}/a"
  num_repeat = 3
""")
    assert error_of(path) == (f"{path}: datasets[0].subsets[1].num_repeat: unknown option `num_repeat` "
                              f"(did you mean `num_repeats`?)")


def test_all_problems_are_listed_together(tmp_path):
    path = write(tmp_path / "ds.toml", """
[general]
shuffle_captions = true
keep_tokens = "1"

[[datasets]]
batchsize = 2
  [[datasets.subsets]]
  image_dir = "x"
  flip_aug = 1
""")
    assert error_of(path) == (
        f"{path}: 4 problems:\n"
        "  general.shuffle_captions: unknown option `shuffle_captions` (did you mean `shuffle_caption`?)\n"
        "  general.keep_tokens: expected an integer, got '1'\n"
        "  datasets[0].batchsize: unknown option `batchsize` (did you mean `batch_size`?)\n"
        "  datasets[0].subsets[0].flip_aug: expected true or false, got 1")


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "ds.toml", "[general]\nshuffle_caption = true\nkeep_tokens = \n")
    message = error_of(path)
    assert message.startswith(f"{path}: TOML syntax error:") and "line 3" in message


def test_json_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "ds.json", '{\n  "general": {\n    "keep_tokens": 1,\n  }\n}\n')
    assert error_of(path) == (f"{path}: JSON syntax error at line 4, column 3: "
                              f"Expecting property name enclosed in double quotes")


@pytest.mark.parametrize("line, expected", [
    ("num_repeats = 2.5", "datasets[0].subsets[0].num_repeats: expected an integer, got 2.5"),
    ('shuffle_caption = "yes"', "datasets[0].subsets[0].shuffle_caption: expected true or false, got 'yes'"),
    ("caption_prefix = 3", "datasets[0].subsets[0].caption_prefix: expected a string, got 3"),
    ("num_repeats = 0", "datasets[0].subsets[0].num_repeats: must be at least 1, got 0"),
    ("caption_dropout_rate = 1.5", "datasets[0].subsets[0].caption_dropout_rate: must be between 0.0 and 1.0, got 1.5"),
    ("is_reg = 1", "datasets[0].subsets[0].is_reg: expected true or false, got 1"),
])
def test_wrong_value_names_key_expectation_and_value(tmp_path, line, expected):
    make_dirs(tmp_path, "a")
    path = write(tmp_path / "ds.toml", one_subset(f'image_dir = "{tmp_path.as_posix()}/a"\n{line}'))
    assert error_of(path) == f"{path}: {expected}"


@pytest.mark.parametrize("table, expected", [
    ("resolution = [512, 512, 3]", "datasets[0].resolution: expected an integer or [width, height], got [512, 512, 3]"),
    ('resolution = "512"', "datasets[0].resolution: expected an integer or [width, height], got '512'"),
    ("batch_size = 0", "datasets[0].batch_size: must be at least 1, got 0"),
    ("bucket_reso_steps = 0", "datasets[0].bucket_reso_steps: must be at least 1, got 0"),
    ("min_bucket_reso = 512\nmax_bucket_reso = 256",
     "datasets[0]: min_bucket_reso (512) is larger than max_bucket_reso (256)"),
])
def test_dataset_option_errors(tmp_path, table, expected):
    make_dirs(tmp_path, "a")
    path = write(tmp_path / "ds.toml", one_subset(f'image_dir = "{tmp_path.as_posix()}/a"', dataset_lines=table))
    assert error_of(path) == f"{path}: {expected}"


def test_unknown_section_suggests_datasets(tmp_path):
    path = write(tmp_path / "ds.toml", '[[dataset]]\nresolution = 512\n')
    assert error_of(path) == (f"{path}: unknown section `dataset`: the file holds [general] and [[datasets]] "
                              f"(did you mean `datasets`?)")


@pytest.mark.parametrize("key, value, reason", [
    ("face_crop_aug_range", "[2.0, 4.0]", "sd-scripts reads face positions from file names (name_cx_cy_w_h.png)"),
    ("custom_attributes", "{ a = 1 }", "it passes per-subset attributes to sd-scripts' own model code"),
    ("network_multiplier", "1.0", "per-dataset LoRA strength is not implemented"),
    ("system_prompt", '"x"', "per-dataset system prompts are not implemented; Lumina 2 takes --system_prompt"),
])
def test_unsupported_sd_scripts_options_are_rejected_by_name_with_the_reason(tmp_path, key, value, reason):
    path = write(tmp_path / "ds.toml", f"[general]\n{key} = {value}\n")
    message = error_of(path)
    assert message.startswith(f"{path}: general.{key}: the sd-scripts option `{key}` is not supported: {reason}")
    assert message.endswith("; remove it")


@pytest.mark.parametrize("key, expected", [
    ("in_json", "`in_json` is the command-line flag; in a dataset config write metadata_file"),
    ("dataset_repeats", "`dataset_repeats` is the command-line flag; in a dataset config write num_repeats"),
])
def test_command_line_names_in_a_dataset_config_name_the_key(tmp_path, key, expected):
    path = write(tmp_path / "ds.toml", one_subset(f'{key} = "x"'))
    assert error_of(path) == f"{path}: datasets[0].subsets[0].{key}: {expected}"


def test_cache_info_is_accepted_and_said_to_do_nothing(tmp_path, caplog):
    make_dirs(tmp_path, "a")
    path = write(tmp_path / "ds.toml", "[general]\ncache_info = true\n" + one_subset(f'image_dir = "{tmp_path.as_posix()}/a"'))
    with caplog.at_level(logging.INFO, logger="library.config.dataset_config"):
        assert load_file(path).datasets[0].subsets[0].image_dir.endswith("/a")
    assert "cache_info: image sizes are read from the image headers" in caplog.text


def test_resize_interpolation_cascades_and_is_checked(tmp_path):
    from library.config.dataset_args import RESIZE_INTERPOLATIONS
    from library.data.images import PIL_FILTERS

    assert set(RESIZE_INTERPOLATIONS) == set(PIL_FILTERS)  # every accepted name has a Pillow filter
    make_dirs(tmp_path, "a", "b")
    root = tmp_path.as_posix()
    text = ('[general]\nresize_interpolation = "bicubic"\n[[datasets]]\n[[datasets.subsets]]\n'
            f'image_dir = "{root}/a"\n[[datasets.subsets]]\nimage_dir = "{root}/b"\nresize_interpolation = "nearest"\n')
    subsets = load_file(write(tmp_path / "ds.toml", text)).datasets[0].subsets
    assert [subset.resize_interpolation for subset in subsets] == ["bicubic", "nearest"]
    flag = load_file(write(tmp_path / "flag.toml", one_subset(f'image_dir = "{root}/a"')), "--resize_interpolation", "box")
    assert flag.datasets[0].subsets[0].resize_interpolation == "box"
    bad = write(tmp_path / "bad.toml", one_subset(f'image_dir = "{root}/a"\nresize_interpolation = "lanczos3"'))
    assert error_of(bad) == (f"{bad}: datasets[0].subsets[0].resize_interpolation: expected one of lanczos, nearest, "
                             "bilinear, linear, bicubic, cubic, area, box (did you mean `lanczos`?), got 'lanczos3'")


@pytest.mark.parametrize("toml_text, expected", [
    ('resolution = 512\n[[datasets]]\n',
     "resolution: `resolution` is outside any section; it belongs in [general] or [[datasets]]"),
    ('[general]\nimage_dir = "x"\n',
     "general.image_dir: `image_dir` cannot be set here; it belongs in [[datasets.subsets]]"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nbatch_size = 2\n',
     "datasets[0].subsets[0].batch_size: `batch_size` cannot be set here; it belongs in [general] or [[datasets]]"),
    ('[datasets]\nresolution = 512\n',
     "datasets: expected a list of [[datasets]] tables (double brackets), got a single table"),
    ('[[datasets]]\n[datasets.subsets]\nimage_dir = "x"\n',
     "datasets[0].subsets: expected a list of [[datasets.subsets]] tables (double brackets), got a single table"),
    ("[general]\nresolution = 512\n",
     "no [[datasets]]: add a [[datasets]] table with at least one [[datasets.subsets]]"),
    ("[[datasets]]\nresolution = 512\n",
     "datasets[0]: no [[datasets.subsets]]: add one with image_dir (or metadata_file)"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n",
     "datasets[0].subsets[0]: a subset needs image_dir (a folder of images) or metadata_file (fine-tuning)"),
])
def test_structure_errors(tmp_path, toml_text, expected):
    path = write(tmp_path / "ds.toml", toml_text)
    assert error_of(path) == f"{path}: {expected}"


def test_missing_image_dir_folder_is_named(tmp_path):
    path = write(tmp_path / "ds.toml", one_subset(f'image_dir = "{tmp_path.as_posix()}/nope"'))
    assert error_of(path) == f"{path}: datasets[0].subsets[0].image_dir: folder not found: {tmp_path.as_posix()}/nope"


def test_relative_missing_folder_mentions_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "ds.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    assert error_of(path) == (f"{path}: datasets[0].subsets[0].image_dir: folder not found: imgs "
                              f"(relative to the current folder {tmp_path})")


def test_missing_metadata_file_is_named(tmp_path):
    md = f"{tmp_path.as_posix()}/md.json"
    path = write(tmp_path / "ds.toml", one_subset(f'metadata_file = "{md}"'))
    assert error_of(path) == f"{path}: datasets[0].subsets[0].metadata_file: file not found: {md}"


@pytest.mark.parametrize("subset_line, expected", [
    ("is_reg = true",
     "datasets[0].subsets[1].is_reg: fine-tuning subsets (metadata_file) cannot be regularisation images: remove it"),
    ('caption_extension = ".txt"',
     "datasets[0].subsets[1].caption_extension: fine-tuning subsets (metadata_file) "
     "take their captions from the metadata file, so this option has no effect: remove it"),
])
def test_fine_tuning_subsets_reject_dreambooth_options(tmp_path, subset_line, expected):
    write(tmp_path / "md.json", "{}")
    md = (tmp_path / "md.json").as_posix()
    path = write(tmp_path / "ds.toml", f'[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "{md}"\n'
                                       f'[[datasets.subsets]]\nmetadata_file = "{md}"\n{subset_line}\n')
    assert error_of(path) == f"{path}: {expected}"


def test_dreambooth_and_fine_tuning_subsets_cannot_share_a_dataset(tmp_path):
    make_dirs(tmp_path, "a")
    write(tmp_path / "md.json", "{}")
    path = write(tmp_path / "ds.toml", f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path.as_posix()}/a"\n'
                                       f'[[datasets.subsets]]\nmetadata_file = "{tmp_path.as_posix()}/md.json"\n')
    assert error_of(path) == (f"{path}: datasets[0]: DreamBooth subsets (image_dir only) and fine-tuning subsets "
                              f"(metadata_file) cannot share a dataset: split them into two [[datasets]]")


def test_folder_flags_with_dataset_config_are_rejected(tmp_path):
    path = write(tmp_path / "ds.toml", "")
    message = error_of(path, "--resolution", "512", "--train_data_dir", tmp_path)
    assert message == (f"--dataset_config {path} defines the image folders, so --train_data_dir would be ignored: "
                       f"list them as [[datasets.subsets]] image_dir (is_reg = true for regularisation) "
                       f"and remove the flags")


def test_dataset_flags_with_dataset_config_are_lowest_priority_defaults(tmp_path):
    """As in sd-scripts: --train_batch_size etc. fill what the file leaves unset, and the file wins."""
    images = tmp_path / "img"
    images.mkdir()
    path = write(tmp_path / "ds.toml", f"[general]\nresolution = 768\n" + one_subset(f"image_dir = '{images}'"))
    spec = load_file(path, "--resolution", "512", "--train_batch_size", "3", "--shuffle_caption")
    dataset = spec.datasets[0]
    assert dataset.resolution == (768, 768)
    assert dataset.batch_size == 3
    assert dataset.subsets[0].captions.shuffle_caption is True


@pytest.mark.parametrize("name, expected", [
    ("ds.yaml", "unknown dataset config format .yaml: use a .toml or .json file"),
    ("missing.toml", "file not found"),
    ("missing.json", "file not found"),
])
def test_unreadable_config_files(tmp_path, name, expected):
    path = tmp_path / name
    if name.endswith(".yaml"):
        write(path, "general: {}\n")
    assert error_of(path) == f"{path}: {expected}"


def test_neither_config_nor_train_data_dir():
    with pytest.raises(UserError, match="pass --dataset_config FILE .* or --train_data_dir FOLDER"):
        load_dataset_group(parse())


def test_train_data_dir_without_repeat_folders(tmp_path):
    make_dirs(tmp_path, "images")
    with pytest.raises(UserError) as caught:
        load_dataset_group(parse("--train_data_dir", tmp_path))
    assert str(caught.value) == (f"--train_data_dir {tmp_path}: no subfolder named `N_class tokens` "
                                 f"(e.g. `10_sks dog`, N = repeats); put the images in such subfolders")


def test_missing_train_data_dir(tmp_path):
    with pytest.raises(UserError, match=r"^--train_data_dir .*/nope: folder not found$"):
        load_dataset_group(parse("--train_data_dir", tmp_path / "nope"))


@pytest.mark.parametrize("argv, expected", [
    (["--train_batch_size", "0"], "<command line>: --train_batch_size: must be at least 1, got 0"),
    (["--caption_tag_dropout_rate", "2"],
     "<command line>: --caption_tag_dropout_rate: must be between 0.0 and 1.0, got 2.0"),
    (["--min_bucket_reso", "2048"], "<command line>: --min_bucket_reso (2048) is larger than --max_bucket_reso (1024)"),
])
def test_bad_cli_values_name_the_flag(tmp_path, argv, expected):
    make_dirs(tmp_path, "1_x")
    with pytest.raises(UserError) as caught:
        load_dataset_group(parse("--train_data_dir", tmp_path, *argv))
    assert str(caught.value) == expected


# --- the flags and the schema tables ---

def test_resolution_flag_parsing():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("512,768") == (512, 768)
    assert parse("--resolution", "640, 480").resolution == (640, 480)
    for bad in ("512x768", "0", "1,2,3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_resolution(bad)


def test_unpassed_dataset_flags_are_none_so_passed_ones_can_be_detected():
    args = vars(parse())
    assert set(args.values()) == {None}
    assert set(args) == {
        "dataset_config", "train_data_dir", "reg_data_dir", "resolution", "train_batch_size", "caption_extension",
        "shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_separator", "secondary_separator",
        "enable_wildcard", "caption_prefix", "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs",
        "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step", "flip_aug", "color_aug", "random_crop",
        "alpha_mask", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
        "trigger_word", "caption_from_path", "resize_interpolation", "dataset_repeats", "in_json",
        "conditioning_data_dir"}


def test_schema_tables_match_the_spec_dataclasses():
    def names(klass):
        return {spec_field.name for spec_field in fields(klass)}

    assert set(dataset_config.CAPTION_OPTIONS) == names(CaptionOptions)
    assert set(dataset_config.SUBSET_OPTIONS) | set(dataset_config.SUBSET_ONLY_OPTIONS) == \
        (names(SubsetSpec) - {"captions"}) | names(CaptionOptions) | set(dataset_config.WITHOUT_EFFECT_OPTIONS)
    assert set(dataset_config.DATASET_OPTIONS) | {"is_validation"} == names(DatasetSpec) - {"subsets"}
