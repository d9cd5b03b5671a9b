"""A CLIP model, loaded from disk, as the score of text-guided style: how close augmented views
of an image are to a prompt.

:func:`load_clip` finds a transformers CLIP model (``config.json`` of ``model_type`` clip, its
weights and tokenizer files) in a local folder or in an EXISTING Hugging Face cache, and never
touches the network (``local_files_only`` always); absent weights raise
:class:`~gigasid.errors.WeightsNotFoundError` naming where it looked. :class:`ClipScore` embeds
the prompt once (the mean of a few phrasings around it) and scores a batch of views (made by
``core.guidance.augmented_views``) by their mean cosine similarity to it, differentiably.

What it is not: a downloader, the guidance rule (``core.guidance``) or the sampling loop
(``plan.style_trip``). transformers is imported here only, so that no other job pays for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from gigasid.errors import ConfigError, WeightsNotFoundError
from gigasid.weights import REPO_ID, cached_folder

__all__ = ["ClipScore", "load_clip"]

# the normalisation CLIP's image encoder was trained with (RGB in [0, 1])
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# phrasings the prompt is embedded in, averaged: one wording's quirks matter less
PHRASINGS = ("{}", "{}.", "an image of {}.", "a picture of {}.", "a good image of {}.", "artwork of {}.")


class ClipScore:
    """A CLIP model and a prompt's embedding: ``score(views)`` is the views' mean cosine
    similarity to the prompt, differentiable in the views ((N, 3, side, side) in [0, 1])."""

    def __init__(self, model, tokenizer, prompt: str, *, location: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.location = location
        self.side = int(model.config.vision_config.image_size)
        texts = [phrase.format(prompt) for phrase in PHRASINGS]
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            text = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            embedded = F.normalize(self.model.text_projection(text.pooler_output), dim=-1)
        self.text = F.normalize(embedded.mean(dim=0), dim=0)
        self._mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def score(self, views: torch.Tensor) -> torch.Tensor:
        if views.shape[-2:] != (self.side, self.side):
            raise ValueError(f"CLIP at {self.location} takes {self.side}x{self.side} views, got {tuple(views.shape)}")
        pixels = ((views - self._mean) / self._std).to(self.model.dtype)
        image = self.model.vision_model(pixel_values=pixels)
        embedded = F.normalize(self.model.visual_projection(image.pooler_output).float(), dim=-1)
        return (embedded @ self.text).mean()


def load_clip(location: str, prompt: str) -> ClipScore:
    """The CLIP model at ``location`` (a folder, or a repo id in the local Hugging Face cache)
    scoring against ``prompt``. Nothing is downloaded."""
    folder = _resolve(location)
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError as error:
        raise ConfigError(
            "text-guided style needs transformers: `pip install 'gigasid[clip]'` (or 'transformers>=4.46')"
        ) from error
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        raise WeightsNotFoundError(
            f"no CLIP weights and tokenizer in {folder} ({first}). {_how_to_fix(location)}"
        ) from error
    return ClipScore(model, tokenizer, prompt, location=location)


def _resolve(location: str) -> Path:
    """The folder of the model: an existing folder, else a repo id's snapshot in the hub cache."""
    folder, _ = cached_folder(location, "CLIP", _how_to_fix(location))
    return _clip_folder(folder, location)


def _clip_folder(folder: Path, location: str) -> Path:
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "clip":
        raise WeightsNotFoundError(f"no config.json of a CLIP model in {folder}. {_how_to_fix(location)}")
    return folder


def _how_to_fix(location: str) -> str:
    from huggingface_hub import constants

    repo = location if REPO_ID.fullmatch(location) else "openai/clip-vit-base-patch32"
    return (
        f"To fix: on a machine with internet, download it (`hf download {repo} --local-dir DIR`) and set "
        f"clip.path to DIR here, or copy a Hugging Face cache that holds it into {constants.HF_HUB_CACHE}."
    )
