"""Training augmentation: geometry, what real scanners vary (window, resolution, noise), synthetic
solid masses (masses.py), synthetic pockets of gas in the negatives' abdomen (gas_pockets.py) and
fainter infection in the labelled slices (faint_infection.py).

The shared slices already carry the intensity recipe (min-max + CLAHE). To show the network what a
different scanner looks like *after* the recipe, a degraded slice is passed through the recipe's last
steps again (min-max, CLAHE), imported from the runtime engine so both sides use one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import albumentations as A
import cv2
import numpy as np

from CovidInfectionSegLib.preprocessing import IntensityRecipe, make_clahe, minmax_to_uint8

from .faint_infection import CONTRAST as FAINT_CONTRAST, fade_infection
from .gas_pockets import FLUID_LEVEL_P as GAS_FLUID_LEVEL_P, RADIUS_PX as GAS_RADIUS_PX, paint_gas_pockets
from .masses import MASS_LABELS, paint_masses


MASS_ON = ("all", "negatives")
# The augmentations that paint into the middle slice only, so a model with context cannot use them.
PAINTED_INTO_ONE_SLICE = {"mass_p": "synthetic masses", "gas_p": "synthetic gas pockets",
                          "faint_p": "fainter infection"}

# Lung texture and gray level of the network's uint8 input, measured 2026-11-30 (ad hoc, AMD EPYC here):
# detail (std of the image minus its Gaussian blur at sigma 1, inside the eroded lung), 5th-95th
# percentile per slice: PNG export 19-42, the sharp kernel L of example-chest-ct 17-31, the soft scans
# read by the engine (LIDC-IDRI-0001/0003, covid-chest-ct, kernel B) 10-20. Mean and std of 32 x 32
# lung patches: export 64-104 and 35-60 per case, engine-read scans 57-84 and 31-41.
BASE_DETAIL_RANGE = (6.0, 9.0)  # blurred down to this, below every scan's
DETAIL_RANGE = (11.0, 32.0)  # then noise up to this, soft to sharp
LUNG_MEAN_RANGE = (55.0, 105.0)
LUNG_STD_RANGE = (30.0, 55.0)
MIN_LUNG_PIXELS = 500


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
    # Reconstruction kernel: half of the drawn slices softened (blur), half sharpened (unsharp mask and
    # fine noise), so that neither texture goes with one data path only (see path_probe.py).
    kernel_p: float = 0.0
    # Harmonise: the slice re-rendered in a random reconstruction kernel (blurred down to a low common
    # detail level, then fine noise up to a random one) and its lung brought to a random gray level and
    # contrast, so that neither texture nor gray level says which data path a slice came from (with it
    # on every slice the path probe's AUC is at chance; see results/path_probe.md).
    # ``harmonise_base_detail``: the range of lung detail the slice is blurred down to before the noise
    # (default 6-9, below every scan's); a higher range keeps more of the slice's own fine texture.
    # ``harmonise_on``: every kind of slice ("all"), or the negative slices only ("negatives"), so that the
    # labelled slices keep their own texture (ground glass is a texture) while the negatives take on every look.
    harmonise_p: float = 0.0
    harmonise_base_detail: tuple[float, float] = BASE_DETAIL_RANGE
    harmonise_on: str = "all"
    # Synthetic solid masses painted into the lung and labelled "lung, no infection" (masses.py), so
    # that nodules and tumours are not called infection. ``mass_on``: into every kind of slice ("all"),
    # or into the negative slices only ("negatives"), so that the labelled COVID-19 slices keep their
    # consolidation untouched. ``mass_halo_p``: the share of masses with a ground-glass halo, as a
    # part-solid nodule has (masses.py). ``mass_from_epoch``: the first epoch (counted from 1) with
    # masses; later than 1, a network that has already learnt the real slices meets them at the end of
    # the learning-rate schedule, as a short fine-tune does, without a second schedule of its own.
    # ``mass_label``: "lung" labels every mass lung; "classical" labels a mass that reaches the lung's edge
    # or is larger than 5 cm2 background, as the classical HU lung mask of the negatives and of the
    # whole-scan checks does (masses.py).
    mass_p: float = 0.0
    mass_on: str = "all"
    mass_halo_p: float = 0.0
    mass_from_epoch: int = 1
    mass_label: str = "lung"
    # Synthetic pockets of gas (an air-filled stomach or bowel loop) painted into the soft tissue of
    # negative slices and labelled background (gas_pockets.py): the negatives' stomachs are not
    # air-filled, and the network alone calls an air-filled stomach lung. ``gas_max_level``: only into
    # negative slices at most this high in their scan's lung (NegativeScan.levels: 0 its lowest slice, 1
    # its highest; a scan without lung counts as below), where stomach and bowel lie; None: every negative
    # slice. Pockets at every level taught the network that the apex (small dark blobs wrapped in soft
    # tissue) is not lung (results/v2/README.md). ``gas_radius_px``: the range of a pocket's radius in
    # pixels of the training slice (default 8-35: about 2-12 cm across). ``gas_fluid_level_p``: the share
    # of pockets with a gas-fluid level, a straight lower edge as a supine stomach has and an apical lung
    # tip has not.
    gas_p: float = 0.0
    gas_max_level: float | None = None
    gas_radius_px: tuple[float, float] = GAS_RADIUS_PX
    gas_fluid_level_p: float = GAS_FLUID_LEVEL_P
    # Fainter infection (faint_infection.py): the share of labelled slices whose infection is brought part of
    # the way back to the clear lung around it, its density above the lung multiplied by a factor drawn from
    # ``faint_contrast``; the label stays infection. The faintest ground glass of the export (cases 01, 13,
    # 18, 19) is what the held-out folds miss most.
    faint_p: float = 0.0
    faint_contrast: tuple[float, float] = FAINT_CONTRAST
    # A slice with its neighbours (context_slices): the neighbours' order reversed. The PNG export does
    # not say which way its slice numbers run in each volume, while the engine's canonical volumes run
    # from the feet up: so the network must not rely on which side is up.
    zflip_p: float = 0.5

    def __post_init__(self) -> None:
        for name in ("mass_on", "harmonise_on"):
            if getattr(self, name) not in MASS_ON:
                raise ValueError(f"augment.{name} must be one of {', '.join(MASS_ON)}, not {getattr(self, name)!r}")
        if self.mass_label not in MASS_LABELS:
            raise ValueError(f"augment.mass_label must be one of {', '.join(MASS_LABELS)}, not {self.mass_label!r}")
        for name in ("gas_radius_px", "harmonise_base_detail"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"augment.{name} must be [low, high] with 0 < low <= high, not {list(getattr(self, name))}")
        low, high = self.faint_contrast
        if not 0 < low <= high <= 1:
            raise ValueError(f"augment.faint_contrast must be [low, high] with 0 < low <= high <= 1, not "
                             f"{list(self.faint_contrast)}")
        for name in ("gas_fluid_level_p", "mass_halo_p", "faint_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must lie in [0, 1], not {getattr(self, name)!r}")
        if isinstance(self.mass_from_epoch, bool) or not isinstance(self.mass_from_epoch, int) or self.mass_from_epoch < 1:
            raise ValueError(f"augment.mass_from_epoch must be a whole number of at least 1 (the first epoch, "
                             f"counted from 1), not {self.mass_from_epoch!r}")

    def in_epoch(self, epoch: int) -> "AugmentConfig":
        """The augmentation of epoch ``epoch`` (counted from 1): without masses before ``mass_from_epoch``,
        where no random number is drawn for them either, so those epochs are the run's without masses."""
        return replace(self, mass_p=0.0) if epoch < self.mass_from_epoch else self


def detail_region(region: np.ndarray) -> np.ndarray | None:
    """Where the texture's detail is measured (:func:`detail_in`): the non-zero pixels of ``region``
    eroded by 2, or None where too few remain to say."""
    inside = cv2.erode((region != 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    return inside if np.count_nonzero(inside) >= MIN_LUNG_PIXELS else None


def detail_in(image: np.ndarray, inside: np.ndarray) -> float:
    """The std of the image minus its Gaussian blur at sigma 1, over the pixels of ``inside``."""
    pixels = image.astype(np.float32)
    return float((pixels - cv2.GaussianBlur(pixels, (0, 0), 1.0))[inside].std())


def blur_to_detail(pixels: np.ndarray, inside: np.ndarray, target: float) -> np.ndarray:
    """``pixels`` Gaussian-blurred just enough that their detail over ``inside`` (:func:`detail_in`)
    falls to ``target`` (bisection over sigma 0.2 to 3)."""
    low, high = 0.2, 3.0
    for _ in range(8):
        sigma = (low + high) / 2
        if detail_in(cv2.GaussianBlur(pixels, (0, 0), sigma), inside) > target:
            low = sigma
        else:
            high = sigma
    return cv2.GaussianBlur(pixels, (0, 0), high)


class SliceAugmenter:
    """Callable ``(image uint8 HxW, label uint8 HxW, negative=False, level=nan) -> (image, label)``, seeded
    by ``rng``; ``negative`` says the slice is a whole-scan negative (for ``mass_on``, ``harmonise_on`` and gas
    pockets),
    ``level`` where it lies in its scan's lung (for ``gas_max_level``)."""

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

    def kernel(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """A softer or a sharper reconstruction kernel, as another scanner setting would give (drawn
        from ``rng``, by default the augmenter's)."""
        rng = rng or self.rng
        pixels = image.astype(np.float32)
        if rng.random() < 0.5:
            return cv2.GaussianBlur(pixels, (0, 0), rng.uniform(0.6, 1.4))
        detail = pixels - cv2.GaussianBlur(pixels, (0, 0), 1.0)
        noise = cv2.GaussianBlur(rng.normal(0.0, 1.0, pixels.shape).astype(np.float32), (0, 0), 0.6)
        noise *= rng.uniform(3.0, 10.0) / max(float(noise.std()), 1e-6)
        return np.clip(pixels + rng.uniform(0.5, 1.5) * detail + noise, 0, 255)

    def harmonise(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The slice re-rendered in a random kernel, its lung (labelled pixels; the whole slice when
        there is too little lung) at a random gray level and contrast (one affine map of the slice);
        drawn from ``rng``, by default the augmenter's."""
        rng = rng or self.rng
        pixels = image.astype(np.float32)
        inside = detail_region(label)
        region = label != 0
        if inside is None:  # too little lung: the whole slice
            region = np.ones(label.shape, dtype=bool)
            inside = detail_region(region)
        base = blur_to_detail(pixels, inside, rng.uniform(*self.config.harmonise_base_detail))
        noise = cv2.GaussianBlur(rng.normal(0.0, 1.0, pixels.shape).astype(np.float32), (0, 0), 0.6)
        have, unit = detail_in(base, inside), detail_in(noise, inside)
        target = rng.uniform(*DETAIL_RANGE)
        rendered = base + np.sqrt(max(0.0, target**2 - have**2)) / max(unit, 1e-6) * noise  # detail adds in squares
        mean, std = float(rendered[region].mean()), float(rendered[region].std())
        gain = rng.uniform(*LUNG_STD_RANGE) / max(std, 1e-3)
        return np.clip((rendered - mean) * gain + rng.uniform(*LUNG_MEAN_RANGE), 0, 255)

    def __call__(self, image: np.ndarray, label: np.ndarray, negative: bool = False,
                 level: float = float("nan")) -> tuple[np.ndarray, np.ndarray]:
        """``image`` one slice (H, W), or a slice with its neighbours as channels (C, H, W), the slice
        in the middle; ``label`` the slice's (H, W); ``level`` a negative slice's height in its scan's lung
        (NaN: unknown, or a scan without lung)."""
        if image.ndim == 3:
            return self.stack(image, label, negative)
        # Fainter infection, masses, gas pockets and harmonisation are drawn only when on, so that configs
        # without them augment exactly as before they existed. The painting comes first: geometry and
        # scanner then act on it too.
        if self.config.faint_p and not negative and self.rng.random() < self.config.faint_p:
            image = fade_infection(image, label, self.rng, self.config.faint_contrast)
        masses_here = self.config.mass_p and (negative or self.config.mass_on == "all")
        if masses_here and self.rng.random() < self.config.mass_p:
            image, label = paint_masses(image, label, self.rng, self.config.mass_halo_p, self.config.mass_label)
        if self.gas_here(negative, level) and self.rng.random() < self.config.gas_p:
            image, label = paint_gas_pockets(image, label, self.rng, self.config.gas_radius_px,
                                             self.config.gas_fluid_level_p)
        out = self.geometry(image=image, mask=label)
        image, label = out["image"], out["mask"]
        if self.harmonise_here(negative) and self.rng.random() < self.config.harmonise_p:
            image = self.harmonise(image, label).astype(np.uint8)
        if self.rng.random() < self.config.kernel_p:
            image = np.clip(self.kernel(image), 0, 255).astype(np.uint8)
        if self.rng.random() < self.config.scanner_p:
            image = self.scanner(image=image)["image"]
            if self.rng.random() < self.config.window_p:
                image = self.window(image)
            image = self.clahe.apply(minmax_to_uint8(image))
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def harmonise_here(self, negative: bool) -> bool:
        """Whether this slice may be harmonised (see ``AugmentConfig.harmonise_on``)."""
        return bool(self.config.harmonise_p) and (negative or self.config.harmonise_on == "all")

    def gas_here(self, negative: bool, level: float) -> bool:
        """Whether gas pockets may be painted into this slice (see ``AugmentConfig.gas_max_level``)."""
        limit = self.config.gas_max_level
        return bool(self.config.gas_p) and negative and (limit is None or not level > limit)

    def stack(self, images: np.ndarray, label: np.ndarray, negative: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A slice and its neighbours (C, H, W) augmented alike: one geometry, and every intensity step
        with the same draws on each channel (what differs between neighbouring slices of one scan is the
        anatomy, not the scanner). The per-slice min-max and CLAHE stay per slice, as the engine does them."""
        for key, painted in PAINTED_INTO_ONE_SLICE.items():
            if getattr(self.config, key):
                raise ValueError(f"augment.{key} paints {painted} into one slice; not with neighbours")
        if self.rng.random() < self.config.zflip_p:
            images = images[::-1]
        out = self.geometry(image=np.ascontiguousarray(np.moveaxis(images, 0, -1)), mask=label)
        pixels, label = out["image"], out["mask"]
        channels = [pixels[..., channel] for channel in range(pixels.shape[-1])]
        if self.harmonise_here(negative) and self.rng.random() < self.config.harmonise_p:
            seed = int(self.rng.integers(2**63))
            channels = [self.harmonise(c, label, np.random.default_rng(seed)).astype(np.uint8) for c in channels]
        if self.rng.random() < self.config.kernel_p:
            seed = int(self.rng.integers(2**63))
            channels = [np.clip(self.kernel(c, np.random.default_rng(seed)), 0, 255).astype(np.uint8) for c in channels]
        if self.rng.random() < self.config.scanner_p:
            degraded = self.scanner(image=np.ascontiguousarray(np.stack(channels, axis=-1)))["image"]
            if self.rng.random() < self.config.window_p:
                degraded = self.window(degraded)
            channels = [self.clahe.apply(minmax_to_uint8(degraded[..., c])) for c in range(degraded.shape[-1])]
        return np.ascontiguousarray(np.stack(channels)), np.ascontiguousarray(label)
