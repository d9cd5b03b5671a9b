"""Where pretrained weights are found: a local folder, or a Hugging Face repo id already in the
local hub cache. Never downloads (``local_files_only`` always: this machine and CI have no hub
access); what is absent raises :class:`~gigasid.errors.WeightsNotFoundError` naming the folder
and the cache looked in. Used by the models gigasid loads (``codecs.vae``, ``guidance.clip``);
what a model's folder must hold is theirs to check."""

from __future__ import annotations

import re
from pathlib import Path

from gigasid.errors import WeightsNotFoundError

__all__ = ["REPO_ID", "cached_folder"]

# A Hugging Face repo id: "namespace/name" (one slash, the hub's characters).
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def cached_folder(location: str, what: str, how_to_fix: str) -> tuple[Path, bool]:
    """The folder ``location`` names and whether it is a hub snapshot (False: a local folder).

    An existing folder wins; otherwise a repo-id-shaped ``location`` is looked up in the hub
    cache. ``what`` names the model in the error ("VAE", "CLIP"), ``how_to_fix`` ends it."""
    path = Path(location).expanduser()
    if path.is_dir():
        return path, False
    if not REPO_ID.fullmatch(location):
        raise WeightsNotFoundError(f"no {what} folder at {path.resolve()}. {how_to_fix}")
    from huggingface_hub import constants, snapshot_download

    cache = constants.HF_HUB_CACHE  # read now, not at import, so a changed setting is honoured
    try:
        snapshot = Path(snapshot_download(location, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError) as error:  # LocalEntryNotFoundError is an OSError
        raise WeightsNotFoundError(
            f"no {what} folder at {path.resolve()}, and repo {location} is not in the Hugging Face"
            f" cache {cache} (nothing is downloaded). {how_to_fix}"
        ) from error
    return snapshot, True
