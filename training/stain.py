"""Stain normalization and augmentation for training.

Normalization itself is the runtime's (leukoedge.preprocess.cpu): training calls the same functions,
so a model never sees colours at training time that the runtime would not produce. What lives here
is only what training adds on top: the reference estimated from data, and random perturbations.
"""

from __future__ import annotations

from typing import Iterable

import cv2
import numpy as np

from leukoedge.preprocess.cpu import StainReference, lab_statistics, reinhard_normalize, to_rgb_float


def estimate_reference(images_bgr: Iterable[np.ndarray]) -> StainReference:
    """The stain reference: mean over images of each image's L*a*b* mean and std."""
    means, stds = [], []
    for image in images_bgr:
        mean, std = lab_statistics(to_rgb_float(image))
        means.append(mean)
        stds.append(std)
    if not means:
        raise ValueError("cannot estimate a stain reference from no images")
    return StainReference(tuple(float(v) for v in np.mean(means, axis=0)), tuple(float(v) for v in np.mean(stds, axis=0)))


def jitter_reference(reference: StainReference, rng: np.random.Generator, strength: float = 1.0) -> StainReference:
    """A random nearby stain: shifts of the L*a*b* target mean and scalings of its std.

    Models trained against one fixed target overfit it; smears from a new lab land near, not on, it.
    """
    mean = np.asarray(reference.lab_mean) + rng.normal(0.0, [4.0, 3.0, 3.0]) * strength
    std = np.asarray(reference.lab_std) * np.exp(rng.normal(0.0, 0.12, 3) * strength)
    return StainReference(tuple(float(v) for v in mean), tuple(float(v) for v in std))


def clahe(image_bgr: np.ndarray, clip_limit: float = 2.0, tile: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalization on the L channel (colour kept)."""
    lab = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile, tile)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)


def gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter; kernel size from sigma."""
    return cv2.GaussianBlur(image, (0, 0), sigma)


def to_hsv(image_bgr: np.ndarray) -> np.ndarray:
    """HSV with OpenCV's 8-bit ranges (H 0..179, S and V 0..255)."""
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV)


def augment_colour(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and occasional blur on a stain-normalized float RGB image in [0, 1]:
    the optical differences (lamp, focus, sensor gain) that stain normalization does not remove."""
    rgb = rgb * rng.uniform(0.85, 1.15) + rng.uniform(-0.06, 0.06)
    mean = rgb.mean()
    rgb = (rgb - mean) * rng.uniform(0.85, 1.2) + mean
    if rng.random() < 0.25:
        rgb = gaussian(rgb, rng.uniform(0.5, 1.2))
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


# The classifier's colour augmentation (strength 1): hue turned up to this many degrees either way, saturation
# scaled by a factor drawn log-uniformly from this range. Wide enough that the sources' palettes overlap: the blasts
# here come from two labs' stains, and a classifier that may read the stain calls another lab's normal cells blasts.
CHROMA_TURN_DEGREES = 45.0
CHROMA_SATURATION = (0.5, 1.6)


def turn_chroma(rgb: np.ndarray, degrees: float, saturation: float) -> np.ndarray:
    """An RGB image (channels first, any scale shared by the channels) with its colour turned about the grey axis
    by `degrees` (a hue rotation) and its distance from grey scaled by `saturation`; each pixel's grey level kept."""
    grey = rgb.mean(axis=0, keepdims=True)
    axis = np.full(3, 1.0 / np.sqrt(3.0))
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    angle = np.deg2rad(degrees)
    rotation = np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross  # Rodrigues' formula
    chroma = np.einsum("ij,jhw->ihw", rotation * saturation, rgb - grey)
    return (grey + chroma).astype(rgb.dtype)


def augment_chroma(rgb: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """turn_chroma with a random turn and saturation (CHROMA_TURN_DEGREES, CHROMA_SATURATION, scaled by strength)."""
    low, high = np.log(CHROMA_SATURATION[0]) * strength, np.log(CHROMA_SATURATION[1]) * strength
    return turn_chroma(rgb, rng.uniform(-CHROMA_TURN_DEGREES, CHROMA_TURN_DEGREES) * strength, float(np.exp(rng.uniform(low, high))))


def normalize_with_jitter(rgb: np.ndarray, reference: StainReference, rng: np.random.Generator | None) -> np.ndarray:
    """Reinhard to the reference (a jittered one when rng is given), with the image's own statistics."""
    target = reference if rng is None else jitter_reference(reference, rng)
    return reinhard_normalize(rgb, target)


def augment_device(frame_bgr: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A BGR uint8 frame as another microscope might have taken it, before the runtime's preprocessing:
    stain (L*a*b* shift and scale, wide enough to cover the sources' spread), white balance, uneven
    illumination, defocus, sensor noise and JPEG. Magnification is left to the caller (boxes move with it)."""
    lab = cv2.cvtColor(frame_bgr.astype(np.float32) / 255.0, cv2.COLOR_BGR2LAB)
    lab[..., 0] = lab[..., 0] * rng.uniform(1 - 0.15 * strength, 1 + 0.1 * strength) + rng.uniform(-8, 8) * strength
    for channel in (1, 2):
        lab[..., channel] = lab[..., channel] * rng.uniform(1 - 0.3 * strength, 1 + 0.4 * strength) + rng.uniform(-12, 12) * strength
    rgb_gain = 1.0 + rng.uniform(-0.12, 0.12, size=3) * strength  # the camera's white balance
    frame = np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2BGR) * rgb_gain, 0.0, 1.0)
    height, width = frame.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)  # a lamp off-centre: a brightness ramp across the field
    ramp = ((xs / width - 0.5) * np.cos(angle) + (ys / height - 0.5) * np.sin(angle)) * rng.uniform(0, 0.25) * strength
    frame = np.clip(frame * (1.0 + ramp[..., None]), 0.0, 1.0)
    if rng.random() < 0.4:
        frame = gaussian(frame, rng.uniform(0.5, 2.0) * strength)
    frame = frame + rng.normal(0.0, rng.uniform(0, 0.025) * strength, size=frame.shape)
    frame = np.clip(frame * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
        frame = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return frame
