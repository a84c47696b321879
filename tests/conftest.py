"""Shared fixtures: tiny models and small image folders built locally, never downloaded."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_sd15_folder(tmp_path_factory):
    from library.tiny_models.sd import save_tiny_sd15_pipeline

    return save_tiny_sd15_pipeline(str(tmp_path_factory.mktemp("tiny_sd15")))


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    from library.tiny_models.sdxl import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture
def demo_image_root(tmp_path):
    """`<tmp>/images/5_shape/*.png` + captions: sd-scripts' train_data_dir convention."""
    from library.demo import write_demo_images

    return write_demo_images(str(tmp_path / "images"), repeats=1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process; in-process runs need a fresh one each."""
    yield
    if "accelerate.state" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an entry script as a user would, in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO_ROOT}
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def save_in_hub_cache(cache: str, repo_id: str, save) -> str:
    """Lay out a snapshot of `repo_id` in a Hugging Face hub cache folder as huggingface_hub writes it
    (models--org--name/snapshots/<commit>/..., refs/main); `save(folder)` writes the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    save(snapshot)
    return snapshot
