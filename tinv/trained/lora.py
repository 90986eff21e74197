"""A LoRA beside the vectors (method=pivotal): low-rank weights in the UNet's attention projections (and optionally
the text encoders'), through peft, diffusers' own LoRA stack. It writes `<name><suffix>-lora.safetensors` (kohya's
layout by default, `save.lora_format=diffusers` for peft's) and, with save.lora_bundle, `-bundle.safetensors`: the
LoRA with the vectors inside, one file for A1111/Forge (the layouts: tinv.formats.lora and tinv.formats.bundle).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..data.prompts import check_one_slot
from ..errors import ConfigError, first_line
from ..formats.bundle import bundle
from ..formats.keys import BASE_MODEL_VERSION
from ..formats.lora import ADAPTER, module_entries
from ..formats.tensorfile import write_safetensors
from ..seeds import derive_seed
from .token import CONTEXT_PROMPTS

log = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention block's projections, self and cross
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def unet_level(unet: nn.Module, path: str) -> int | None:
    """How many times a UNet has halved the latent where the module at `path` works (diffusers' UNet2DConditionModel
    of every family: down block i at i, the middle at the deepest, up blocks mirrored); None outside the blocks."""
    block, _, rest = path.partition(".")
    if block == "down_blocks":
        return int(rest.split(".")[0])
    if block == "up_blocks":
        return len(unet.up_blocks) - 1 - int(rest.split(".")[0])
    return len(unet.down_blocks) - 1 if block == "mid_block" else None


class GradOnlyDropout(nn.Module):
    """LoRA dropout that acts only while gradients are computed: training steps drop, validation, previews and
    scoring (all under no_grad) see the whole LoRA, whatever mode the frozen modules are in."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.p, training=torch.is_grad_enabled())


class LoraWeights:
    """The LoRA part (tinv.parts interface): peft LoRA layers injected into the frozen UNet (and, with
    `text_encoder`, each text encoder), trained with their own learning rates from `start_frac` to `stop_frac` of
    the run. The base weights never change: peft keeps them in `base_layer`, frozen."""

    def __init__(self, rank: int = 4, alpha: float | None = None, dropout: float = 0.0, lr: float = 1e-4,
                 text_encoder: bool = False, text_encoder_lr: float | None = None,
                 unet_targets: list[str] | None = None, text_encoder_targets: list[str] | None = None,
                 start_frac: float = 0.0, stop_frac: float = 1.0, format: str = "kohya", bundle: bool = True,
                 preserve_weight: float = 0.0, preserve_prompts: list[str] | None = None,
                 context_prompts: list[str] | None = None, preserve_with: str = "word",
                 unet_levels: list[int] | None = None, background_prior: float = 0.0,
                 background_with: str = "caption", background_margin: float = 0.0):
        # the limits of these values are the schema's (tinv.config.LoraConfig), checked before any model loads
        self.rank, self.alpha, self.dropout = rank, float(alpha if alpha is not None else rank), dropout
        self.lr, self.text_encoder, self.text_encoder_lr = lr, text_encoder, text_encoder_lr or lr
        self.unet_targets = list(unet_targets or UNET_TARGETS)
        self.unet_levels = None if unet_levels is None else sorted(set(unet_levels))
        self.text_encoder_targets = list(text_encoder_targets or TEXT_ENCODER_TARGETS)
        self.start_frac, self.stop_frac = start_frac, stop_frac
        self.format, self.bundle = format, bundle
        self.preserve_prompts = list(preserve_prompts or context_prompts or CONTEXT_PROMPTS)
        if preserve_weight or (background_prior and background_with == "context"):
            check_one_slot(self.preserve_prompts, "lora.preserve_prompts", "the init word or the token")
        self.preserve_weight, self.preserve_with = preserve_weight, preserve_with
        self.background_prior, self.background_with = background_prior, background_with
        self.background_margin = background_margin
        self.layers: dict[str, dict[str, nn.Module]] = {}  # owner (unet | encoder key) -> {module path: LoRA layer}

    # ---- setup ------------------------------------------------------------------------------------------------------

    def setup(self, run) -> None:
        unet = run.backbone.unet
        owners = {"unet": (unet, self._unet_modules(unet), "lora.unet_targets")}
        if self.text_encoder:
            owners.update({enc.key: (enc.model, self.text_encoder_targets, "lora.text_encoder_targets")
                           for enc in run.backbone.encoders})
        # the same start on every process and every resume: the init draws come from the run's seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(run.seed, -1) % 2**63)  # -1: an index no micro-step uses
            for owner, (model, targets, key) in owners.items():
                self.layers[owner] = self._inject(model, targets, key)
        self.family, self.token, self.run = run.backbone.family, run.token, run
        if self.preserve_weight:
            if self.preserve_with == "word" and not run.token.init_word:
                raise ConfigError("lora.preserve_with=word keeps what the base model draws for the init word's "
                                  "prompts; set token.init_word too (or lora.preserve_with=token)")
            word = run.token.init_word if self.preserve_with == "word" else run.token.string
            self.preserved = [p.format(word) for p in self.preserve_prompts]
            self.reference = f"a {word}"  # preserve_with=edit: what the other words of a prompt change is against this
            if self.preserve_with == "context":
                self._context_setup(run)
        # lora.background_with=context: the token in the prompts that ask for other backgrounds
        self.background_prompts = [p.format(run.token.string) for p in self.preserve_prompts]
        log.info("LoRA rank %d, alpha %g in %d modules (%s)", self.rank, self.alpha,
                 sum(len(v) for v in self.layers.values()), ", ".join(self.layers))
        if self.background_prior:
            log.info("with masks: background prior %g on the %s prompts, a margin of %g around the subject",
                     self.background_prior, self.background_with, self.background_margin)

    def _unet_modules(self, unet: nn.Module) -> list[str]:
        """peft's target_modules for the UNet: the target endings, or, with lora.unet_levels, the full paths of the
        modules they name at those resolution levels."""
        if self.unet_levels is None:
            return self.unet_targets
        ends = tuple(f".{t}" for t in self.unet_targets)
        named = [path for path, _ in unet.named_modules() if path.endswith(ends)]
        if not named:  # no such module at any level: peft's own error names the targets
            return self.unet_targets
        chosen = [path for path in named if unet_level(unet, path) in self.unet_levels]
        if not chosen:
            have = sorted({unet_level(unet, path) for path in named} - {None})
            raise ConfigError(f"lora.unet_levels={self.unet_levels}: no {self.unet_targets} module at those levels; "
                              f"this UNet has them at levels {have} (0 = the latent's own size)")
        return chosen

    def _context_setup(self, run) -> None:
        """preserve_with=context: the cross-attention key/value layers with a LoRA, and which positions of the
        preserved prompts are not the token (BOS, the other words, EOS and padding)."""
        unet = run.backbone.unet
        self.cross = [layer for path, layer in self.layers["unet"].items() if path.endswith((".to_k", ".to_v"))
                      and getattr(unet.get_submodule(path.rsplit(".", 1)[0]), "is_cross_attention", False)]
        if not self.cross:
            raise ConfigError(f"lora.preserve_with=context keeps the keys and values cross-attention reads; "
                              f"lora.unet_targets={self.unet_targets} has none: add attn2.to_k and attn2.to_v")
        others = [path for path, layer in self.layers["unet"].items() if layer not in self.cross]
        if others:
            log.warning("lora.preserve_with=context keeps only cross-attention keys and values; %d other LoRA "
                        "modules (e.g. %s) change every prompt unchecked", len(others), others[0])
        self.context_ids = run.input_ids(self.preserved)
        self.others = self.context_ids[0] < run.token.first_ids[run.backbone.encoders[0].key]  # new ids come last

    def _context_change(self) -> torch.Tensor:
        """The mean squared change the LoRA makes to the keys and values of every position but the token's, relative
        to their size, on the preserved prompts: the LoRA may change what the token says, not what the rest does."""
        bb = self.run.backbone
        with torch.no_grad():
            states = bb.cross_attention_states(self.context_ids)
            states = states[self.others.to(states.device)]
        terms = []
        for layer in self.cross:
            x = states.to(layer.lora_A[ADAPTER].weight.dtype)
            change = layer.lora_B[ADAPTER](layer.lora_A[ADAPTER](x)) * layer.scaling[ADAPTER]
            with torch.no_grad():
                size = layer.base_layer(states.to(layer.base_layer.weight.dtype)).float().pow(2).mean()
            terms.append(change.float().pow(2).mean() / size)
        return torch.stack(terms).mean()

    def _inject(self, model: nn.Module, targets: list[str], key: str) -> dict[str, nn.Module]:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=targets,
                            init_lora_weights=True)
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        except ValueError as err:
            raise ConfigError(f"{key}={targets}: {first_line(err)}; name module-name endings of the model, e.g. "
                              f"{list(UNET_TARGETS if 'unet' in key else TEXT_ENCODER_TARGETS)}") from None
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}
        for layer in layers.values():
            for sub in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
                sub.to(torch.float32).requires_grad_(True)  # trained in fp32 whatever the frozen model's dtype
            if self.dropout:
                layer.lora_dropout[ADAPTER] = GradOnlyDropout(self.dropout)
        return layers

    # ---- training ---------------------------------------------------------------------------------------------------

    def _params(self, owner: str) -> list[nn.Parameter]:
        return [p for layer in self.layers[owner].values()
                for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]

    def parameters(self) -> list[nn.Parameter]:
        return [p for owner in self.layers for p in self._params(owner)]

    def param_groups(self) -> list[dict]:
        groups = [{"params": self._params("unet"), "lr": self.lr}]
        encoders = [p for owner in self.layers if owner != "unet" for p in self._params(owner)]
        if encoders:
            groups.append({"params": encoders, "lr": self.text_encoder_lr})
        return groups

    def trains(self, step: int, max_steps: int) -> bool:
        """Whether the step with this 0-based index trains the LoRA (lora.start_frac, lora.stop_frac)."""
        return self.start_frac * max_steps <= step < self.stop_frac * max_steps

    def loss_term(self, micro) -> torch.Tensor | float:
        """While the LoRA trains: its background prior (with masks) plus its preservation term."""
        if not self._params("unet")[0].requires_grad:
            return 0.0
        term = 0.0
        if self.background_prior and micro.masks is not None and micro.prediction is not None:
            term = term + self.background_prior * self._background_change(micro)
        if self.preserve_weight:
            term = term + self.preserve_weight * self._preserved_change(micro)
        return term

    def _background_change(self, micro) -> torch.Tensor:
        """lora.background_prior: the mean squared change the LoRA makes to the prediction where the mask is off,
        the model without the LoRA (the vectors kept) as the teacher, so the training background teaches the LoRA
        nothing (OneTrainer's masked prior preservation). `caption`: on the batch's own captions; `context`: on the
        token's prompts that ask for other content (one more UNet pass), so the LoRA leaves a background the prompt
        asks for as the vectors alone draw it, and stays free inside the subject."""
        if self.background_with == "context":
            prediction, target = self._with_and_without(micro, self._cycled(self.background_prompts, micro))
        else:
            prediction = micro.prediction
            target = self._without(micro, self.run.input_ids(micro.batch["prompts"]))
        change = (prediction.float() - target.float()) ** 2
        return (change * self._far_background(micro.masks.to(change.dtype))).mean()

    def _far_background(self, masks: torch.Tensor) -> torch.Tensor:
        """Where the prior holds: the mask's background, less a band of lora.background_margin (a fraction of the
        latent's shorter side) around the subject, where the LoRA may still draw an outline the vectors cannot (a
        star's points and the background between them)."""
        cells = round(self.background_margin * min(masks.shape[-2:]))
        if cells:
            masks = nn.functional.max_pool2d(masks, 2 * cells + 1, stride=1, padding=cells)
        return 1.0 - masks

    def _preserved_change(self, micro) -> torch.Tensor:
        """The mean squared change the LoRA makes, on this micro-batch's noised latents, to the UNet's output
        (`word`, `token`) or to the difference the rest of a prompt makes to it (`edit`: "a <token> on a gray
        background" minus "a <token>"), against the model without the LoRA as the teacher (no class images): the
        LoRA learns what is particular to the token and leaves the rest of what prompts can say as it was. `edit`
        lets the LoRA change how the token draws, only not how the other words act on it. `context` needs no UNet
        pass: see _context_change."""
        if self.preserve_with == "context":
            return self._context_change()
        n = micro.noisy.shape[0]
        pred, target = self._with_and_without(micro, self._cycled(self.preserved, micro))
        if self.preserve_with == "edit":
            alone, alone_target = self._with_and_without(micro, [self.reference] * n)
            pred, target = pred - alone, target - alone_target
        return nn.functional.mse_loss(pred.float(), target.float())

    def _cycled(self, prompts: list[str], micro) -> list[str]:
        """One prompt per sample of the micro-batch, cycling with the micro-steps: the same on a resume."""
        n = micro.noisy.shape[0]
        start = self.run.state.micro_step * n
        return [prompts[(start + i) % len(prompts)] for i in range(n)]

    def _with_and_without(self, micro, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's output for `prompts` on the micro-batch's noised latents with the LoRA (with gradients) and
        without it (the teacher)."""
        bb, ids = self.run.backbone, self.run.input_ids(prompts)
        target = self._without(micro, ids)
        return bb.predict(micro.noisy.to(bb.unet.dtype), micro.timesteps, ids, micro.batch), target

    @torch.no_grad()
    def _without(self, micro, ids) -> torch.Tensor:
        """The model's output without the LoRA (no gradients) on the micro-batch's noised latents."""
        bb = self.run.backbone
        with self.switched_off():
            return bb.predict(micro.noisy.to(bb.unet.dtype), micro.timesteps, ids, micro.batch)

    @contextmanager
    def switched_off(self):
        """The model as it was before the LoRA (a scorer's class word is drawn so); everything restored after."""
        wanted = [p.requires_grad for p in self.parameters()]
        self._adapters(False)
        try:
            yield
        finally:
            self._adapters(True)
            for p, grad in zip(self.parameters(), wanted):  # peft's switch also sets requires_grad; keep ours
                p.requires_grad_(grad)

    def _adapters(self, enabled: bool) -> None:
        for layers in self.layers.values():
            for layer in layers.values():
                layer.enable_adapters(enabled)

    def after_step(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        """The LoRA's effective size: the norm of every up x down product (its change to the weights), together."""
        with torch.no_grad():
            total = sum(float((self._delta(layer) ** 2).sum()) for owner in self.layers
                        for layer in self.layers[owner].values())
        return {"lora/delta_norm": total ** 0.5}

    def _delta(self, layer) -> torch.Tensor:
        up, down = layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight
        return up.flatten(1) @ down.flatten(1) * (self.alpha / self.rank)

    # ---- state and files --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{owner}/{path}/{part}": getattr(layer, part)[ADAPTER].weight.detach().float().cpu().clone()
                for owner, layers in self.layers.items() for path, layer in layers.items()
                for part in ("lora_A", "lora_B")}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in mine):
            ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A")}
            raise ConfigError(f"resume: the saved LoRA (rank {sorted(ranks)}, {len(state) // 2} modules) does not "
                              f"match this run's (rank {self.rank}, {len(mine) // 2} modules); resume with the "
                              "run's own lora.* settings")
        for key, value in state.items():
            owner, path, part = key.split("/")
            weight = getattr(self.layers[owner][path], part)[ADAPTER].weight
            weight.copy_(value.to(weight.device, weight.dtype))

    def tensors(self, fmt: str = "kohya") -> dict[str, torch.Tensor]:
        """The LoRA in a file layout (kohya, diffusers), fp32 on the CPU."""
        out = {}
        for owner, layers in self.layers.items():
            for path, layer in layers.items():
                down = layer.lora_A[ADAPTER].weight.detach().float().cpu().contiguous()
                up = layer.lora_B[ADAPTER].weight.detach().float().cpu().contiguous()
                out.update(module_entries(owner, path, down, up, self.alpha, fmt))
        return out

    def metadata(self, run) -> dict[str, str]:
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha), "ss_base_model_version": BASE_MODEL_VERSION[self.family],
                "ss_output_name": run.output_name, "ss_steps": str(run.step), "tinv.token": run.output_name,
                "tinv.family": self.family, "tinv.base_model": run.backbone.source, "tinv.step": str(run.step),
                "tinv.model": run.backbone.name}

    def write(self, run, suffix: str) -> dict[str, Path]:
        stem = f"{run.output_name}{suffix}"
        meta = self.metadata(run)
        kohya = self.tensors("kohya") if self.bundle or self.format == "kohya" else None
        lora = kohya if self.format == "kohya" else self.tensors(self.format)
        written = {"lora": write_safetensors(run.run_dir / f"{stem}-lora.safetensors", lora,
                                              dict(meta, **{"tinv.lora_format": self.format}))}
        if self.bundle:
            bundled = bundle(kohya, run.output_name, self.token.vectors())  # A1111's word for it: the run's name
            written["lora_bundle"] = write_safetensors(run.run_dir / f"{stem}-bundle.safetensors", bundled,
                                                        dict(meta, **{"tinv.lora_format": "kohya"}))
        return written
