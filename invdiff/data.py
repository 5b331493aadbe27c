"""Data that ships inside packages, with fixed held-out splits; images in ``[0, 1]``, float64.

* ``digits``: the 8x8 digits of scikit-learn's ``load_digits``, shape ``(N, 1, 8, 8)``.
* ``natural_images``: photographs from ``skimage.data``, grayscale (``NATURAL_SPLIT``) or in colour
  (``NATURAL_RGB_SPLIT``, ``colour=True``); two of each are held out (never trained on) and used for
  the imaging problems. ``random_patches`` crops training patches from them at several scales.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["DIGITS_SPLIT", "digits", "NATURAL_SPLIT", "NATURAL_RGB_SPLIT", "natural_images", "heldout_crop",
           "random_patches", "training_moments"]

#: how the digits are split: a permutation drawn with this seed; the first ``test_size`` are held out
DIGITS_SPLIT = {"seed": 0, "test_size": 300}


def digits(split: str) -> Tensor:
    """The ``train`` (1497 images) or ``test`` (300 held-out images) part of ``load_digits``."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    images = load_digits().images / 16.0
    order = np.random.default_rng(DIGITS_SPLIT["seed"]).permutation(len(images))
    test_size = DIGITS_SPLIT["test_size"]
    chosen = order[:test_size] if split == "test" else order[test_size:]
    return torch.from_numpy(images[chosen]).to(torch.float64)[:, None]


#: the photographs of ``skimage.data`` used as natural images (``chelsea`` is the same photo as ``cat``);
#: synthetic pictures (checkerboard, logo, phantom, colour wheel) and binary ones (horse) are left out
NATURAL_SPLIT = {
    "train": ["astronaut", "brick", "cat", "cell", "clock", "coins", "grass", "gravel", "hubble_deep_field",
              "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket", "text"],
    "test": ["camera", "coffee"],
}


#: the colour photographs of ``skimage.data`` (``astronaut``, in the grayscale training split, is held out in
#: colour); ``colorwheel`` and ``logo`` are synthetic, ``skin`` and ``lily`` are not installed with scikit-image
NATURAL_RGB_SPLIT = {
    "train": ["cat", "hubble_deep_field", "immunohistochemistry", "retina", "rocket"],
    "test": ["astronaut", "coffee"],
}


def natural_images(split: str, colour: bool = False) -> dict[str, np.ndarray]:
    """The ``train`` or ``test`` photographs in ``[0, 1]``: those of ``NATURAL_SPLIT`` as grayscale
    ``(H, W)`` arrays, or with ``colour`` those of ``NATURAL_RGB_SPLIT`` as RGB ``(H, W, 3)`` arrays."""
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.util import img_as_float

    names = (NATURAL_RGB_SPLIT if colour else NATURAL_SPLIT).get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    images = {}
    for name in names:
        image = img_as_float(getattr(skimage.data, name)())
        if image.ndim == 3 and image.shape[-1] == 4:
            image = rgba2rgb(image)
        if image.ndim == 3 and not colour:
            image = rgb2gray(image)
        images[name] = image.astype(np.float64)
    return images


def _rescaled(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` (``(H, W)`` or ``(H, W, C)``) downscaled by ``scale``, anti-aliased, each channel alike."""
    from skimage.transform import rescale

    return rescale(image, 1 / scale, anti_aliasing=True, channel_axis=-1 if image.ndim == 3 else None)


def heldout_crop(name: str, top: int, left: int, size: int, scale: int = 1, colour: bool = False) -> Tensor:
    """A ``size x size`` crop of a held-out photograph downscaled by ``scale``: shape ``(1, 1, size, size)``,
    or ``(1, 3, size, size)`` from the colour photographs (``NATURAL_RGB_SPLIT``) with ``colour``."""
    heldout = (NATURAL_RGB_SPLIT if colour else NATURAL_SPLIT)["test"]
    if name not in heldout:
        raise ValueError(f"'{name}' is not a held-out {'colour' if colour else 'grayscale'} natural image; "
                         f"allowed: {', '.join(heldout)}")
    image = natural_images("test", colour)[name]
    if scale != 1:
        image = _rescaled(image, scale)
    if not (0 <= top and 0 <= left and top + size <= image.shape[0] and left + size <= image.shape[1]):
        raise ValueError(f"crop {size}x{size} at ({top}, {left}) does not fit '{name}' of size {image.shape[:2]} "
                         f"(at scale 1/{scale})")
    crop = image[top:top + size, left:left + size].reshape(size, size, -1)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(crop, -1, 0)))[None]


class random_patches:
    """An endless source of random training patches ``(batch, C, size, size)`` in ``[0, 1]``, from grayscale
    ``(H, W)`` pictures (``C = 1``) or colour ``(H, W, C)`` ones.

    Each photograph is kept at the downscaling factors ``scales`` (anti-aliased); a patch picks a
    picture (uniformly), a position, a horizontal flip and a rotation by a multiple of 90 degrees.
    """

    def __init__(self, images: dict[str, np.ndarray], size: int, scales: tuple[int, ...] = (1, 2, 4)):
        self.size = size
        pictures = [image if scale == 1 else _rescaled(image, scale) for image in images.values() for scale in scales]
        pictures = [torch.from_numpy(picture) for picture in pictures if min(picture.shape[:2]) >= size]
        # all pictures in one tensor of pixels (rows: pixels, columns: channels), so that a batch of crops is one gather
        self.pixels = torch.cat([picture.reshape(picture.shape[0] * picture.shape[1], -1) for picture in pictures])
        self.heights = torch.tensor([picture.shape[0] for picture in pictures])
        self.widths = torch.tensor([picture.shape[1] for picture in pictures])
        self.offsets = torch.cumsum(self.heights * self.widths, 0) - self.heights * self.widths

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        choices = torch.randint(len(self.heights), (batch_size,), generator=generator)
        uniform = torch.rand((3, batch_size), generator=generator, dtype=torch.float64)
        top = (uniform[0] * (self.heights[choices] - self.size + 1)).long()
        left = (uniform[1] * (self.widths[choices] - self.size + 1)).long()
        turns = torch.randint(4, (batch_size,), generator=generator)
        rows = (top[:, None] + torch.arange(self.size))[:, :, None]
        columns = (left[:, None] + torch.arange(self.size))[:, None, :]
        patches = self.pixels[self.offsets[choices, None, None] + rows * self.widths[choices, None, None] + columns]
        patches = torch.where((uniform[2] < 0.5)[:, None, None, None], patches.flip(2), patches)
        for turn in (1, 2, 3):
            chosen = turns == turn
            patches[chosen] = torch.rot90(patches[chosen], turn, dims=(1, 2))
        # a fresh (B, C, size, size) layout: a permuted view would make convolutions pick channels-last kernels
        return patches.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def training_moments(data: dict, event_shape: tuple[int, ...], num_patches: int = 16384,
                     seed: int = 0) -> tuple[Tensor, Tensor] | None:
    """The mean ``(d,)`` and covariance ``(d, d)``, float64, of the training data that ``data`` describes (a
    training configuration's ``data``: ``{source: digits}``, or ``{source: natural | natural_rgb, scales}``),
    mapped to ``[-1, 1]`` as training maps it, over events of ``event_shape``: every training digit, or
    ``num_patches`` random patches of that size (``random_patches``, seeded). None for another source or an
    event shape the data do not have."""
    source = data.get("source")
    if source == "digits":
        if tuple(event_shape) != (1, 8, 8):
            return None
        images = digits("train").flatten(1)
    elif source in ("natural", "natural_rgb"):
        channels = 3 if source == "natural_rgb" else 1
        if len(event_shape) != 3 or event_shape[0] != channels or event_shape[1] != event_shape[2]:
            return None
        patches = random_patches(natural_images("train", source == "natural_rgb"), event_shape[1],
                                 tuple(data.get("scales", (1, 2, 4))))
        images = patches.sample(num_patches, torch.Generator().manual_seed(seed)).flatten(1)
    else:
        return None
    centred = 2 * (images - images.mean(0))
    return 2 * images.mean(0) - 1, centred.T @ centred / (len(images) - 1)
