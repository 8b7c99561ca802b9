"""Where a ChatGLM3 checkpoint's files come from: a local folder, or a Hugging Face hub repo id."""

from __future__ import annotations

import os
from pathlib import Path


def checkpoint_file(path_or_repo: str | os.PathLike[str], filename: str, *, revision: str | None = None) -> Path:
    """`filename` in a local checkpoint folder, else downloaded (and cached) from the hub repo `path_or_repo`."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        file = path / filename
        if not file.is_file():
            raise FileNotFoundError(f"no {filename} in {path}")
        return file
    repo_id = str(path_or_repo)
    # A hub id is exactly "owner/name"; anything else is a local path that does not exist.
    if repo_id.startswith((".", "/", "~")) or "\\" in repo_id or repo_id.count("/") != 1:
        raise FileNotFoundError(f"{repo_id} is neither a local folder nor a hub repo id (owner/name)")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
