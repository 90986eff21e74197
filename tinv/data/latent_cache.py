"""Latents encoded once, kept in memory and (optionally) on disk, with their masks at the latents' size.

A disk entry's name is a hash of everything its pixels depend on: the image file's bytes, the VAE (config and a
weight fingerprint), the bucket, the crop, the flip, the resize filter and the mask file's bytes. A stale entry can
therefore never be used: change one image or one mask and only that one is re-encoded. Entries are written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import first_line
from .buckets import fit_to_bucket
from .masks import to_latent_size

log = logging.getLogger(__name__)

CACHE_VERSION = "1"


def vae_fingerprint(vae) -> str:
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name in ("encoder.conv_in.weight", "quant_conv.weight"):
        tensor = vae.state_dict().get(name)
        if tensor is not None:
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    def __init__(self, data, backbone, cache_dir: str | Path | None = None, batch_size: int = 4):
        self.data, self.backbone, self.batch_size = data, backbone, batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.masks: dict[tuple[int, bool], torch.Tensor] = {}  # (1, h, w) at the latent's size; only with masks

    def _key(self, index: int, flip: bool, vae_id: str, file_hashes: dict) -> str:
        sample = self.data.samples[index]
        sub, ds = self.data.subsets[sample.subset], self.data.specs[sample.dataset]
        _, crop = fit_to_bucket(sample.size, sample.bucket)
        parts = [CACHE_VERSION, file_hashes[sample.path], vae_id, sample.bucket, crop, flip,
                 sub.resize_interpolation or ds.resize_interpolation or "lanczos"]
        if self.data.has_masks:  # an entry without masks keeps its old name
            parts.append(sample.mask.fingerprint() if sample.mask else "unmasked")
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    @torch.no_grad()
    def build(self, device: torch.device) -> int:
        """Fill the cache; returns how many latents the VAE had to encode."""
        from safetensors.torch import save_file

        wanted = [(i, flip) for i, s in enumerate(self.data.samples)
                  for flip in ((False, True) if self.data.subsets[s.subset].flip_aug else (False,))]
        keys = {}
        if self.cache_dir is not None:
            vae_id = vae_fingerprint(self.backbone.vae)
            hashes = {s.path: hashlib.sha256(s.path.read_bytes()).hexdigest() for s in self.data.samples}
            keys = {w: self._key(*w, vae_id, hashes) for w in wanted}
        pending = []
        for w in wanted:
            path = self._path(keys[w]) if keys else None
            entry = self._read_entry(path, self._shape(w[0])) if path is not None and path.is_file() else None
            if entry is not None:
                self._keep(w, entry, device)
            else:
                pending.append(w)
        # one VAE batch holds one bucket size
        by_bucket: dict[tuple, list] = {}
        for w in pending:
            by_bucket.setdefault(self.data.samples[w[0]].bucket, []).append(w)
        for group in by_bucket.values():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                pixels = torch.stack([self.data.pixels(i, flip) for i, flip in chunk])
                latents = self.backbone.encode_latents(pixels).float()
                for w, latent in zip(chunk, latents):
                    entry = {"latent": latent.cpu().contiguous()}
                    if self.data.has_masks:
                        entry["mask"] = to_latent_size(self.data.mask(*w)[None], tuple(latent.shape[-2:]))[0]
                    self._keep(w, entry, device)
                    if keys:
                        with atomic_path(self._path(keys[w])) as tmp:
                            save_file(entry, str(tmp))
        if self.cache_dir is not None:
            log.info("latent cache %s: %d reused, %d encoded", self.cache_dir, len(wanted) - len(pending), len(pending))
        return len(pending)

    def _keep(self, w: tuple[int, bool], entry: dict[str, torch.Tensor], device: torch.device) -> None:
        self.latents[w] = entry["latent"].to(device)
        if "mask" in entry:
            self.masks[w] = entry["mask"].to(device)

    def _shape(self, index: int) -> tuple[int, int, int]:
        """The latent's shape for a sample: (channels, bucket height / f, bucket width / f)."""
        config = self.backbone.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        width, height = self.data.samples[index].bucket
        return config.latent_channels, height // factor, width // factor

    def _read_entry(self, path: Path, shape: tuple[int, int, int]) -> dict[str, torch.Tensor] | None:
        """A disk entry, or None when it is broken (cut short by a kill or a full disk, flipped bytes, another
        shape, NaN, a mask missing): a warning, and the caller encodes it again and writes it over the broken one."""
        from safetensors.torch import load_file

        try:
            entry = load_file(str(path))
            latent, mask = entry["latent"], entry.get("mask")
            problem = (f"shape {tuple(latent.shape)}, not {shape}" if tuple(latent.shape) != shape else
                       "NaN or inf values" if not torch.isfinite(latent).all() else
                       "no mask" if self.data.has_masks and (mask is None or mask.shape[-2:] != latent.shape[-2:])
                       else None)
        except Exception as err:  # noqa: BLE001 - unreadable in any way: the same remedy
            problem = first_line(err)
        if problem is None:
            return entry
        log.warning("latent cache entry %s is broken (%s); encoding it again", path, problem)
        return None

    def get(self, samples: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.latents[(int(i), bool(f))] for i, f in zip(samples, flips)])

    def get_masks(self, samples: torch.Tensor, flips: torch.Tensor) -> torch.Tensor | None:
        if not self.masks:
            return None
        return torch.stack([self.masks[(int(i), bool(f))] for i, f in zip(samples, flips)])


class Latents:
    """Where a batch's latents come from: the cache, filled once before training (steps then do no VAE work), or
    the VAE on every step when the pixels change from step to step (random crops, colour jitter) or caching is off."""

    def __init__(self, backbone, device: torch.device, cache: LatentCache | None = None,
                 build_s: float | None = None):
        self.backbone, self.device, self.cache = backbone, device, cache
        self.build_s = build_s  # seconds spent filling the cache

    @classmethod
    def prepare(cls, dataset, backbone, device: torch.device, cache: bool = True, cache_dir: str | None = None,
                vae_batch_size: int = 4) -> "Latents":
        """Fill the cache (also on disk when `cache_dir` is given) unless off or impossible; then the VAE leaves the
        accelerator."""
        if not cache:
            return cls(backbone, device)
        blockers = sorted({k for sub in dataset.subsets for k in ("random_crop", "color_aug") if getattr(sub, k)})
        if blockers:
            log.warning("latent caching is off: %s change the pixels every step", " and ".join(blockers))
            return cls(backbone, device)
        started = time.perf_counter()
        filled = LatentCache(dataset, backbone, cache_dir, vae_batch_size)
        filled.build(device)
        backbone.vae.to("cpu")  # no longer needed on the accelerator
        return cls(backbone, device, filled, time.perf_counter() - started)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def of(self, batch: dict) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.get(batch["sample"], batch["flip"])
        with torch.no_grad():
            return self.backbone.encode_latents(batch["pixel_values"]).float().to(self.device)

    def masks_of(self, batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
        """The batch's masks at the latents' size, (B, 1, h, w); None when the data has no masks."""
        if self.cache is not None:
            return self.cache.get_masks(batch["sample"], batch["flip"])
        if batch.get("mask") is None:
            return None
        return to_latent_size(batch["mask"], tuple(latents.shape[-2:])).to(latents.device)
