"""Training augmentation: geometry, and what real scanners vary (window, resolution, noise).

The shared slices already carry the intensity recipe (min-max + CLAHE). To show the network what a
different scanner looks like *after* the recipe, a degraded slice is passed through the recipe's last
steps again (min-max, CLAHE), imported from the runtime engine so both sides use one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

from CovidInfectionSegLib.preprocessing import IntensityRecipe, make_clahe, minmax_to_uint8


@dataclass
class AugmentConfig:
    flip_p: float = 0.5
    rotate90_p: float = 0.2
    affine_p: float = 0.7
    rotate_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.75, 1.3)
    translate: float = 0.08
    elastic_p: float = 0.2
    scanner_p: float = 0.6
    window_p: float = 0.4
    downsample_p: float = 0.35
    downsample_range: tuple[float, float] = (0.3, 0.8)
    blur_p: float = 0.25
    noise_p: float = 0.3
    gamma_p: float = 0.3


class SliceAugmenter:
    """Callable ``(image uint8 HxW, label uint8 HxW) -> (image, label)``, seeded by ``rng``."""

    def __init__(self, config: AugmentConfig, recipe: IntensityRecipe, seed: int = 0):
        self.config = config
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.clahe = make_clahe(recipe)
        c = config
        self.geometry = A.Compose(
            [
                A.HorizontalFlip(p=c.flip_p),
                A.RandomRotate90(p=c.rotate90_p),
                A.Affine(
                    scale=c.scale_range,
                    translate_percent=(-c.translate, c.translate),
                    rotate=(-c.rotate_degrees, c.rotate_degrees),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=c.affine_p,
                ),
                A.ElasticTransform(alpha=40, sigma=6, p=c.elastic_p),
            ],
            seed=int(self.rng.integers(2**31)),
        )
        self.scanner = A.Compose(
            [
                A.Downscale(
                    scale_range=c.downsample_range,
                    interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_CUBIC},
                    p=c.downsample_p,
                ),
                A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.5, 1.5), p=c.blur_p),
                A.GaussNoise(std_range=(0.01, 0.06), p=c.noise_p),
                A.RandomGamma(gamma_limit=(70, 150), p=c.gamma_p),
            ],
            seed=int(self.rng.integers(2**31)),
        )

    def reseed(self, *keys: int) -> None:
        """Make the next draws depend only on ``keys`` (e.g. seed, epoch, position in the epoch), so a
        slice is augmented the same way whichever process or resumed run draws it."""
        self.rng = np.random.default_rng([self.seed, *keys])
        self.geometry.set_random_seed(int(self.rng.integers(2**31)))
        self.scanner.set_random_seed(int(self.rng.integers(2**31)))

    def window(self, image: np.ndarray) -> np.ndarray:
        """Clip to a random sub-range, as a narrower scanner or export window would."""
        low = self.rng.uniform(0, 40)
        high = self.rng.uniform(150, 255)
        return np.clip(image.astype(np.float32), low, high)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.geometry(image=image, mask=label)
        image, label = out["image"], out["mask"]
        if self.rng.random() < self.config.scanner_p:
            image = self.scanner(image=image)["image"]
            if self.rng.random() < self.config.window_p:
                image = self.window(image)
            image = self.clahe.apply(minmax_to_uint8(image))
        return np.ascontiguousarray(image), np.ascontiguousarray(label)
