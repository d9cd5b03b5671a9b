"""Latent spaces (DESIGN.md §6): the codecs a latent job samples in, behind one small contract.

A codec maps a (C, H, W) image in [-1, 1] to a (K, ⌈H/f⌉, ⌈W/f⌉) latent grid (f = ``factor``) and
back. Latent cell (i, j) stands for the pixel block [f·i, f·i + f) × [f·j, f·j + f), whatever the
codec reads around it. Codecs are local: a latent cell depends on pixels within ``encode_halo``
pixels of its block, a pixel on cells within ``decode_halo`` cells of its own; so both directions
run tile by tile on crops with those halos (:func:`encode_box`, :func:`decode_box`), which is exact
for the lapped PCA codec and an overlap approximation for a VAE (its receptive field is wider than
any halo we read). Pure torch: no files, no Dask — the callers read and write the crops.

Registry: ``pixel`` (identity), ``pca`` (:mod:`.lapped_pca`, fitted on the reference, the
default for large jobs), ``vae`` (:mod:`.vae`, a diffusers autoencoder loaded from disk).
"""

from __future__ import annotations

from typing import Protocol

import torch

Box = tuple[int, int, int, int]  # half-open (row0, col0, row1, col1)


class Codec(Protocol):
    """What a latent job needs from a latent space."""

    name: str
    factor: int  # pixels per latent cell, per side
    channels: int  # K, latent channels
    image_channels: int  # C of the images it encodes (1 or 3)
    encode_halo: int  # pixels read beyond a latent box's blocks (a multiple of ``factor``)
    decode_halo: int  # latent cells read beyond the cells of a pixel box

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(C, H, W) in [-1, 1] → (K, ⌈H/f⌉, ⌈W/f⌉), float32; the crop's edges are treated as
        the image's edges (replicated)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(K, h, w) → (C, f·h, f·w) in roughly [-1, 1], float32."""

    def state(self) -> dict:
        """What rebuilds the codec: plain values and numpy arrays (stored in the job store)."""


def latent_shape(height: int, width: int, factor: int) -> tuple[int, int]:
    """The latent grid of an H×W image: one cell per (possibly partial) f×f block."""
    return -(-height // factor), -(-width // factor)


def encode_box(codec: Codec, read_pixels, shape: tuple[int, int], box: Box) -> torch.Tensor:
    """The latents of ``box`` (latent cells) of an image of pixel ``shape``, from a crop.

    ``read_pixels((r0, c0, r1, c1))`` returns the image's (C, r1-r0, c1-c0) pixels in that box
    (always inside the image). The crop extends ``encode_halo`` pixels beyond the box's blocks,
    clipped to the image, and the cells of the box are cut out of its encoding.
    """
    f, halo = codec.factor, codec.encode_halo
    height, width = shape
    r0, c0, r1, c1 = box
    top, left = max(0, f * r0 - halo), max(0, f * c0 - halo)
    bottom, right = min(height, f * r1 + halo), min(width, f * c1 + halo)
    latents = codec.encode(read_pixels((top, left, bottom, right)))
    dr, dc = (f * r0 - top) // f, (f * c0 - left) // f
    return latents[:, dr : dr + r1 - r0, dc : dc + c1 - c0]


def decode_box(codec: Codec, read_latents, latent_grid: tuple[int, int], box: Box) -> torch.Tensor:
    """The pixels of ``box`` (pixels, inside f × ``latent_grid``) decoded from a latent crop.

    ``read_latents((r0, c0, r1, c1))`` returns (K, r1-r0, c1-c0) latents (always inside the grid).
    """
    f, halo = codec.factor, codec.decode_halo
    r0, c0, r1, c1 = box
    top, left = max(0, r0 // f - halo), max(0, c0 // f - halo)
    bottom = min(latent_grid[0], -(-r1 // f) + halo)
    right = min(latent_grid[1], -(-c1 // f) + halo)
    pixels = codec.decode(read_latents((top, left, bottom, right)))
    return pixels[:, r0 - f * top : r1 - f * top, c0 - f * left : c1 - f * left]


class PixelCodec:
    """The identity: pixel-space sampling, the paper's default for small and medium images."""

    name = "pixel"
    factor = 1
    encode_halo = 0
    decode_halo = 0

    def __init__(self, image_channels: int):
        self.channels = self.image_channels = image_channels

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(torch.float32)

    def state(self) -> dict:
        return {"name": self.name, "image_channels": self.image_channels}


def encode_bands(codec: Codec, read_pixels, shape: tuple[int, int], *, band_cells: int = 64):
    """Yield (first latent row, latents) bands of a whole image's encoding, ``band_cells`` rows
    at a time: the one way every path (in memory or from a store) encodes a reference, so they
    agree to the bit."""
    rows, cols = latent_shape(*shape, codec.factor)
    for r0 in range(0, rows, band_cells):
        yield r0, encode_box(codec, read_pixels, shape, (r0, 0, min(rows, r0 + band_cells), cols))


def _pca_from_state(state: dict) -> Codec:
    from gigasid.codecs.lapped_pca import LappedPCACodec

    return LappedPCACodec.from_state(state)


def _vae_from_state(state: dict) -> Codec:
    from gigasid.codecs.vae import VaeCodec

    return VaeCodec.from_state(state)


#: codec name → rebuild from :meth:`Codec.state` (the modules load only when used)
FROM_STATE = {
    "pixel": lambda state: PixelCodec(int(state["image_channels"])),
    "pca": _pca_from_state,
    "vae": _vae_from_state,
}


def from_state(state: dict) -> Codec:
    """Rebuild a codec from what :meth:`Codec.state` returned (as a job store keeps it)."""
    name = state.get("name")
    if name not in FROM_STATE:
        raise ValueError(f"unknown codec {name!r}")
    return FROM_STATE[name](state)
