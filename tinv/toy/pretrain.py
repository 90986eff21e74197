"""Pretraining of the toy model and its judge on the toy world, deterministic from a seed.

Three stages, each from the one before: the judge (renders with noise and blur, so it also reads imperfect
samples), the VAE (renders -> 16x16x4 latents -> renders), then the text encoder and UNet together on a fixed
pool of cached latents with captions drawn per step. The demo concept is left out of the pool entirely. Weights
are written after each stage and at every checkpoint, so a long run can be inspected while it goes on.
"""

from __future__ import annotations

import json
import logging
import random
import time
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_path, write_text_atomic
from ..data.templates import OBJECT_TEMPLATES
from ..losses import DiffusionLoss
from ..resources import follow_load
from . import world
from .judge import HEADS, Judge, to_tensor
from .model import build_pipeline, save_weights

log = logging.getLogger("tinv.toy")


def _render_labelled(rng: random.Random, n: int, concepts: list[world.Concept]):
    chosen = [concepts[rng.randrange(len(concepts))] for _ in range(n)]
    return world.render_batch(chosen, rng), torch.tensor([c.labels() for c in chosen])


def _degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and blur like an imperfect sample, on a random half of the batch."""
    n = x.shape[0]
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen)
    y = x * (1 - mix) + blurred * mix + torch.randn(x.shape, generator=gen) * 0.08 * torch.rand(n, 1, 1, 1, generator=gen)
    return pick * y + (1 - pick) * x


def train_judge(steps: int, seed: int, batch: int = 128, vae=None) -> tuple[Judge, float]:
    """With a `vae`, a quarter of each batch is its reconstruction: samples reach the judge through that decoder,
    which blurs a thin star point into something squarer."""
    rng, gen = random.Random(f"judge:{seed}"), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge, concepts = Judge(), world.judged_concepts()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        images, labels = _render_labelled(rng, batch, concepts)
        x = to_tensor(images)
        if vae is not None:
            with torch.no_grad():
                x[:batch // 4] = vae.decode(vae.encode(x[:batch // 4]).latent_dist.mean).sample.clamp(-1, 1)
        logits = judge(_degrade(x, gen))
        loss = sum(F.cross_entropy(logits[k], labels[:, i]) for i, k in enumerate(HEADS))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        follow_load()
        if step % 200 == 0:
            log.info("judge step %d loss %.4f", step, loss.item())
    judge.eval().requires_grad_(False)
    return judge, judge_accuracy(judge, seed + 1)


def save_judge(judge: Judge, out_dir: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(out_dir / "judge.safetensors") as tmp:
        save_file({k: v.half().contiguous() for k, v in judge.state_dict().items()}, str(tmp))


def retrain_judge(out_dir: Path, steps: int, seed: int) -> dict:
    """The judge alone, for every concept the world renders (a new attribute needs no new diffusion model), checked
    on fresh renders and on the shipped VAE's reconstructions of them; writes judge.safetensors and judge.json."""
    from .model import build_pipeline, load_weights

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    vae = load_weights(build_pipeline()).vae
    judge, acc = train_judge(steps, seed, vae=vae)
    save_judge(judge, out_dir)
    images, labels = _render_labelled(random.Random(f"vae-check:{seed}"), 1000, world.judged_concepts())
    with torch.no_grad():
        recon = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample.clamp(-1, 1)
    hits = (judge.predict(recon) == labels).all(1)
    novel = torch.tensor([world.ALL_SHAPES[int(i)] in world.NOVEL_SHAPES for i in labels[:, 0]])
    report = {"seed": seed, "judge_steps": steps, "torch_threads": torch.get_num_threads(),
              "judge_heldout_accuracy": acc, "judge_on_vae_reconstructions": hits.float().mean().item(),
              "judge_on_vae_reconstructions_novel": hits[novel].float().mean().item(),
              "judge_minutes": (time.time() - t0) / 60,
              "command": f"tinv-toy judge OUT --seed {seed} --steps {steps}"}
    write_text_atomic(out_dir / "judge.json", json.dumps(report, indent=1) + "\n")
    return report


def judge_accuracy(judge: Judge, seed: int, n: int = 2000) -> float:
    """Held-out accuracy (all three attributes right) on fresh renders from a seed training never used."""
    images, labels = _render_labelled(random.Random(f"judge-heldout:{seed}"), n, world.judged_concepts())
    return (judge.predict(to_tensor(images)) == labels).all(dim=1).float().mean().item()


def train_vae(vae, steps: int, seed: int, batch: int = 64) -> float:
    rng = random.Random(f"vae:{seed}")
    torch.manual_seed(seed)
    concepts = world.all_concepts()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        x = to_tensor(_render_labelled(rng, batch, concepts)[0])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        follow_load()
        if step % 200 == 0:
            log.info("vae step %d loss %.5f", step, loss.item())
    vae.eval().requires_grad_(False)
    # scale latents to unit variance, as SD's 0.18215 does for its VAE
    with torch.no_grad():
        x = to_tensor(_render_labelled(random.Random(f"vae-scale:{seed}"), 512, concepts)[0])
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return loss.item()


def training_concepts() -> list[world.Concept]:
    demo = world.Concept(*world.DEMO_CONCEPT)
    return [c for c in world.all_concepts() if c != demo]


@torch.no_grad()
def latent_pool(vae, per_concept: int, seed: int) -> tuple[torch.Tensor, list[world.Concept]]:
    rng = random.Random(f"pool:{seed}")
    concepts = [c for c in training_concepts() for _ in range(per_concept)]
    latents = []
    for i in range(0, len(concepts), 256):
        x = to_tensor(world.render_batch(concepts[i:i + 256], rng))
        latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(latents), concepts


def pretrain_caption(concept: world.Concept, rng: random.Random) -> str:
    """A description (full, partial or empty), bare ("a ...") or inside a random object template."""
    desc = world.caption(concept, rng)
    if desc and rng.random() < 0.4:
        return rng.choice(OBJECT_TEMPLATES).format(desc)
    return world.as_prompt(desc)


def train_denoiser(pipe, latents: torch.Tensor, concepts: list[world.Concept], steps: int, seed: int,
                   batch: int = 64, lr: float = 5e-4, ema_decay: float = 0.999, on_checkpoint=None,
                   checkpoint_every: int = 500, first_step: int = 0) -> dict:
    """Text encoder + UNet on the latent pool: epsilon loss with Min-SNR-5 weighting; leaves the final EMA in the
    pipeline. `first_step` > 0 continues an earlier run's count (fresh optimizer, data streams of their own)."""
    rng = random.Random(f"denoiser:{seed}" + (f":{first_step}" if first_step else ""))
    gen = torch.Generator().manual_seed(seed + first_step * 7919)
    torch.manual_seed(seed + first_step)
    te, unet, tok, sched = pipe.text_encoder, pipe.unet, pipe.tokenizer, pipe.scheduler
    params = list(te.parameters()) + list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10 + 1)
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    loss_fn = DiffusionLoss(min_snr_gamma=5.0)
    te.train(), unet.train()
    history = []
    start = time.time()
    for step in range(first_step + 1, first_step + steps + 1):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        prompts = [pretrain_caption(concepts[i], rng) for i in idx.tolist()]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        loss = loss_fn(lambda noisy, steps: unet(noisy, steps, te(ids)[0]).sample, sched, "epsilon", x0, noise, t)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_at.step()
        follow_load()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        history.append(loss.item())
        if step % 100 == 0:
            log.info("denoiser step %d loss %.4f (mean of last 100 %.4f) %.1f min", step, loss.item(),
                     sum(history[-100:]) / 100, (time.time() - start) / 60)
        if on_checkpoint and (step % checkpoint_every == 0 or step == first_step + steps):
            on_checkpoint(step, _with_weights(pipe, params, ema))
    _copy_into(params, ema)
    te.eval(), unet.eval()
    return {"final_loss_mean100": sum(history[-100:]) / min(100, len(history))}


def _copy_into(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _with_weights(pipe, params, values):
    """A copy of the pipeline carrying `values` (the EMA) instead of the live weights."""
    live = [p.detach().clone() for p in params]
    _copy_into(params, values)
    snapshot = deepcopy(pipe)
    _copy_into(params, live)
    snapshot.text_encoder.eval(), snapshot.unet.eval()
    return snapshot


def pretrain(out_dir: Path, seed: int = 0, judge_steps: int = 800, vae_steps: int = 1000,
             denoiser_steps: int = 3000, per_concept: int = 600, eval_samples: int = 2,
             continue_from: Path | None = None) -> dict:
    """All three stages; or, with `continue_from` (an earlier output), more text encoder + UNet steps on top of its
    judge, VAE and EMA weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"seed": seed, "judge_steps": judge_steps, "vae_steps": vae_steps, "denoiser_steps": denoiser_steps,
              "per_concept": per_concept, "torch_threads": torch.get_num_threads()}
    if continue_from is not None:
        return _continue(Path(continue_from), out_dir, report, seed, denoiser_steps, per_concept, eval_samples)
    t0 = time.time()
    judge, acc = train_judge(judge_steps, seed)
    save_judge(judge, out_dir)
    report.update(judge_heldout_accuracy=acc, judge_minutes=(time.time() - t0) / 60)
    log.info("judge held-out accuracy %.4f", acc)

    t0 = time.time()
    pipe = build_pipeline(seed)
    report["vae_final_loss"] = train_vae(pipe.vae, vae_steps, seed)
    recon_images, recon_labels = _render_labelled(random.Random(f"vae-check:{seed}"), 1000, world.all_concepts())
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(to_tensor(recon_images)).latent_dist.mean).sample
    report["judge_on_vae_reconstructions"] = (judge.predict(recon.clamp(-1, 1)) == recon_labels).all(1).float().mean().item()
    report["vae_minutes"] = (time.time() - t0) / 60
    log.info("judge on VAE reconstructions %.4f", report["judge_on_vae_reconstructions"])

    t0 = time.time()
    latents, concepts = latent_pool(pipe.vae, per_concept, seed)
    report["pool_minutes"] = (time.time() - t0) / 60

    t_den = time.time()
    report.update(train_denoiser(pipe, latents, concepts, denoiser_steps, seed,
                                 on_checkpoint=_checkpointer(out_dir, report, judge, eval_samples, t_den),
                                 checkpoint_every=1000))
    report["denoiser_minutes"] = (time.time() - t_den) / 60
    save_weights(pipe, out_dir)
    write_text_atomic(out_dir / "pretrain.json", json.dumps(report, indent=1) + "\n")
    return report


def base_accuracy(pipe, judge, per_concept: int, guidance_scale: float | None = None) -> float:
    """Mean concept accuracy over every concept, each drawn from its full bare caption."""
    from .model import GUIDANCE_SCALE
    from .scoring import sample_images

    concepts = world.all_concepts()
    prompts = [world.as_prompt(c.text()) for c in concepts for _ in range(per_concept)]
    images = sample_images(pipe, prompts, list(range(len(prompts))), guidance_scale or GUIDANCE_SCALE)
    want = torch.tensor([c.labels() for c in concepts for _ in range(per_concept)])
    return (judge.predict(to_tensor(images)) == want).all(1).float().mean().item()


def _checkpointer(out_dir: Path, report: dict, judge, eval_samples: int, started: float):
    """Writes the EMA weights (and a quick base-model score) into out_dir, and the report so far."""
    checkpoints = report.setdefault("checkpoints", [])

    def on_checkpoint(step, snapshot):
        save_weights(snapshot, out_dir)
        entry = {"step": step, "minutes": (time.time() - started) / 60}
        if eval_samples:
            entry["base_full_caption_accuracy"] = base_accuracy(snapshot, judge, eval_samples)
        checkpoints.append(entry)
        write_text_atomic(out_dir / "pretrain.json", json.dumps(report, indent=1) + "\n")
        log.info("checkpoint %s", entry)

    return on_checkpoint


def _continue(source: Path, out_dir: Path, report: dict, seed: int, steps: int, per_concept: int,
              eval_samples: int) -> dict:
    import shutil

    from .judge import load_judge
    from .model import load_weights

    earlier = json.loads((source / "pretrain.json").read_text())
    done = earlier.get("denoiser_steps_total", earlier["denoiser_steps"])
    judge = load_judge(source / "judge.safetensors")
    if source.resolve() != out_dir.resolve():
        shutil.copy2(source / "judge.safetensors", out_dir / "judge.safetensors")
    pipe = load_weights(build_pipeline(seed), source)
    report.update(continued_from=earlier, denoiser_steps_total=done + steps)
    for key in ("judge_heldout_accuracy", "judge_on_vae_reconstructions"):
        report[key] = earlier.get(key)
    t0 = time.time()
    latents, concepts = latent_pool(pipe.vae, per_concept, seed)
    report.update(train_denoiser(pipe, latents, concepts, steps, seed,
                                 on_checkpoint=_checkpointer(out_dir, report, judge, eval_samples, t0),
                                 checkpoint_every=500, first_step=done))
    report["denoiser_minutes"] = (time.time() - t0) / 60
    save_weights(pipe, out_dir)
    write_text_atomic(out_dir / "pretrain.json", json.dumps(report, indent=1) + "\n")
    return report
