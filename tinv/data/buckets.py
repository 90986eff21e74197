"""Aspect-ratio buckets: sizes of about the training area, each a multiple of the step, one per aspect ratio.

An image goes to the bucket whose aspect ratio is closest to its own, is scaled to cover it and cropped to it.
With `bucket_no_upscale` an image smaller than the training area keeps its size, rounded down to the step, in a
bucket of its own size; a larger one is scaled down to the area first.
"""

from __future__ import annotations

import math


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs with width * height <= the training area, sides in [min_reso, max_reso]."""
    area = resolution[0] * resolution[1]
    buckets = set()
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    side = int(math.sqrt(area)) // step * step
    buckets.add((side, side))
    return sorted(buckets)


def closest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (compared in log space, so 2:1 and 1:2 are alike)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def no_upscale_bucket(size: tuple[int, int], resolution: tuple[int, int], step: int) -> tuple[int, int]:
    """The image's own size (scaled down to the area if larger), rounded down to the step."""
    width, height = size
    area = resolution[0] * resolution[1]
    if width * height > area:
        scale = math.sqrt(area / (width * height))
        width, height = width * scale, height * scale
    return (max(step, int(width) // step * step), max(step, int(height) // step * step))


def fit_to_bucket(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Scaled size that covers the bucket, and the centred crop offset (top, left) inside it."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    return resized, ((resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2)
