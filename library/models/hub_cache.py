"""Hub ids in the local Hugging Face cache: what an offline run (HF_HUB_OFFLINE=1) loads a hub id from.

Whatever we look up by hub id (the T5 and Gemma tokenizers, a diffusers model or VAE repo) comes
from the snapshot already in the user's cache when the hub is offline, as transformers'
`local_files_only` does; every sd-scripts FLUX or SD3 user has `google/t5-v1_1-xxl` there. The cache
folder is read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub, else
huggingface_hub's default) and `huggingface_hub.snapshot_download(local_files_only=True)` resolves
the snapshot through refs/main. The error names the repository and the folder that was searched.
"""

from __future__ import annotations

import os

from library.errors import UserError


def hub_is_offline() -> bool:
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def hub_errors() -> tuple:
    """The exception types a failed hub download raises (to turn them into a UserError)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    errors: list = [OSError, HfHubHTTPError, LocalEntryNotFoundError]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def hub_cache_dir() -> str:
    """The hub cache folder as huggingface_hub resolves it, from the environment as it is now."""
    import huggingface_hub.constants

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return huggingface_hub.constants.HF_HUB_CACHE


def cached_snapshot(repo_id: str, what: str, fix: str) -> str:
    """The folder of `repo_id`'s cached snapshot; UserError naming `what` was looked for, where, and `fix`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise UserError(f"no {what}: the model hub is offline (HF_HUB_OFFLINE) and {repo_id} is not in the "
                        f"Hugging Face cache {cache}; {fix}") from e


def cached_tokenizer_folder(repo_id: str, files: tuple[str, ...], what: str, fix: str) -> str:
    """The cached snapshot of `repo_id` holding one of the tokenizer `files`."""
    folder = cached_snapshot(repo_id, what, fix)
    if not any(os.path.isfile(os.path.join(folder, name)) for name in files):
        raise UserError(f"no {what}: the cached {repo_id} in {folder} has none of {', '.join(files)}; {fix}")
    return folder
