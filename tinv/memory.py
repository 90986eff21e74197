"""Room in memory for the run's largest work, checked once the models are loaded and before the latents are encoded:
a resolution or batch the machine cannot hold is a one-line error at the start, not a machine swapping for minutes.

The estimate is a lower bound from the shapes involved, so it refuses only what cannot fit: the VAE encoding a
batch of the largest bucket at full pixel size (the first encoder level holds a few copies of its widest
activation), or a UNet step on that bucket's latents (the activations the backward pass keeps, per latent pixel and
channel of the first level). Both factors were measured here as the peak resident memory around one call on the
tiny models (tiny_sd15, 512 and 1024 pixels, batch 1 to 4): the VAE keeps 5.1 copies (5 used), the UNet's step 280
(100 used: real UNets differ more from the tiny one than VAEs do, and a false refusal costs more than a late
failure). A 4096-pixel run of tiny_sd15 held 22 GB before this check refused it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .diskspace import human
from .errors import ConfigError

VAE_COPIES = 5  # widest encoder activations alive at once, per image (5.1 measured), besides its pixels
UNET_COPIES = 100  # first-level activations kept for the backward pass, per latent pixel
USABLE = 0.8  # of the free memory: the rest is the allocator's and everything else's


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process: the GPU's free memory, or the machine's available memory within a container's
    limit; None when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def largest_bucket(dataset) -> tuple[int, int]:
    return max((s.bucket for s in dataset.samples), key=lambda b: b[0] * b[1])


def needed_bytes(backbone, dataset, vae_batch_size: int, cached: bool, checkpointing: bool) -> dict[str, int]:
    """{what: bytes} at least, for the largest bucket of `dataset`."""
    width, height = largest_bucket(dataset)
    batch = max(ds.batch_size for ds in dataset.specs)
    vae, unet = backbone.vae.config, backbone.unet.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    vae_bytes = next(backbone.vae.parameters()).element_size()
    unet_bytes = 2 if next(backbone.unet.parameters()).dtype in (torch.float16, torch.bfloat16) else 4
    encoded = min(vae_batch_size, len(dataset.samples)) if cached else batch
    return {"encoding the latents": encoded * width * height * (vae.block_out_channels[0] * VAE_COPIES + 3) * vae_bytes,
            "a training step": batch * (width // factor) * (height // factor) * unet.block_out_channels[0]
            * unet_bytes * UNET_COPIES // (4 if checkpointing else 1)}  # recomputed, not kept


def check_memory(backbone, dataset, device: torch.device, vae_batch_size: int, cached: bool,
                 checkpointing: bool) -> None:
    """One line naming the sizes to lower when the largest work cannot fit in the free memory."""
    free = free_bytes(device)
    if free is None:
        return
    needs = needed_bytes(backbone, dataset, vae_batch_size, cached, checkpointing)
    what, need = max(needs.items(), key=lambda item: item[1])
    if need <= USABLE * free:
        return
    width, height = largest_bucket(dataset)
    where = "the GPU" if device.type == "cuda" else "this machine"
    raise ConfigError(f"{what} at {width}x{height} needs about {human(need)}, more than {USABLE:.0%} of the "
                      f"{human(free)} free on {where}: "
                      f"lower data.resolution (the model's own is {backbone.native_resolution}), "
                      f"{'data.vae_batch_size' if what.startswith('encoding') else 'train.batch_size'} or the "
                      "buckets' max_bucket_reso (train.check_memory=false starts anyway)")
