"""A LoRA beside the vectors (method=pivotal): low-rank weights in the UNet's attention projections (and optionally
the text encoders'), through peft, diffusers' own LoRA stack, and the files every UI loads.

Files, for `<name><suffix>`:
- `<name>-lora.safetensors`: the LoRA alone. kohya/A1111 key layout by default (`lora_unet_<module path with _>`,
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; text encoders `lora_te_` or, for SDXL, `lora_te1_`/`lora_te2_`),
  which A1111, Forge and ComfyUI load and diffusers' `load_lora_weights` converts; `save.lora_format=diffusers`
  writes the peft layout (`unet.<path>.lora_A.weight`, ...) with alpha/rank folded into the up weights.
- `<name>-bundle.safetensors` (save.lora_bundle): the kohya-layout LoRA plus the vectors as A1111's bundled
  embedding, `bundle_emb.<token>.<emb_params|clip_l|clip_g>`: one file for A1111/Forge's Lora folder. diffusers
  refuses a file with bundle keys, and ComfyUI does not read them, hence the two plain files beside it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path
from .choices import LoraFormat, PreserveWith
from .embedding import SD_KEY, SDXL_KEYS
from .errors import ConfigError, first_line
from .seeds import derive_seed

log = logging.getLogger(__name__)

ADAPTER = "tinv"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention block's projections, self and cross
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_FORMATS, PRESERVE_WITH = LoraFormat.values(), PreserveWith.values()
BUNDLE_PREFIX = "bundle_emb."
# module owner -> (kohya prefix, diffusers prefix); SDXL's encoders are numbered in kohya's layout
KOHYA_PREFIX = {"unet": "lora_unet", SD_KEY: "lora_te", "clip_l": "lora_te1", "clip_g": "lora_te2"}
DIFFUSERS_PREFIX = {"unet": "unet", SD_KEY: "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version


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


def canonical_path(owner: str, path: str) -> str:
    """A module's path as the LoRA formats name it: transformers 5's CLIPTextModel dropped the `text_model.` level
    that the file layouts (and CLIPTextModelWithProjection) keep."""
    if owner != "unet" and not path.startswith("text_model."):
        return f"text_model.{path}"
    return path


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
                 unet_levels: list[int] | None = None):
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"lora.dropout={dropout} must be in [0, 1)")
        if not 0.0 <= start_frac < stop_frac <= 1.0:
            raise ConfigError(f"lora.start_frac={start_frac} and lora.stop_frac={stop_frac} must satisfy "
                              "0 <= start_frac < stop_frac <= 1 (fractions of train.max_steps)")
        if format not in LORA_FORMATS:
            raise ConfigError(f"save.lora_format={format!r}; use one of {', '.join(LORA_FORMATS)}")
        if rank < 1 or lr <= 0 or (text_encoder_lr is not None and text_encoder_lr <= 0):
            raise ConfigError(f"lora.rank={rank} must be at least 1 and lora.lr={lr} (lora.text_encoder_lr="
                              f"{text_encoder_lr}) above 0")
        self.rank, self.alpha, self.dropout = rank, float(alpha if alpha is not None else rank), dropout
        self.lr, self.text_encoder, self.text_encoder_lr = lr, text_encoder, text_encoder_lr or lr
        self.unet_targets = list(unet_targets or UNET_TARGETS)
        if unet_levels is not None and (not unet_levels or any(level < 0 for level in unet_levels)):
            raise ConfigError(f"lora.unet_levels={list(unet_levels)} must name levels >= 0 (0 = the latent's own "
                              "size, 1 = halved once, ...), or be null for every level")
        self.unet_levels = None if unet_levels is None else sorted(set(unet_levels))
        self.text_encoder_targets = list(text_encoder_targets or TEXT_ENCODER_TARGETS)
        self.start_frac, self.stop_frac = start_frac, stop_frac
        self.format, self.bundle = format, bundle
        if preserve_weight < 0:
            raise ConfigError(f"lora.preserve_weight={preserve_weight} must be at least 0 (0 = off)")
        from .parts import CONTEXT_PROMPTS

        preserve_prompts = preserve_prompts or context_prompts or CONTEXT_PROMPTS
        bad = [p for p in preserve_prompts if p.count("{}") != 1]
        if preserve_weight and bad:
            raise ConfigError(f"lora.preserve_prompts entry {bad[0]!r} needs exactly one '{{}}' for the init word")
        if preserve_with not in PRESERVE_WITH:
            raise ConfigError(f"lora.preserve_with={preserve_with!r}; use one of {', '.join(PRESERVE_WITH)}")
        self.preserve_weight, self.preserve_prompts = preserve_weight, list(preserve_prompts or [])
        self.preserve_with = preserve_with
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
        log.info("LoRA rank %d, alpha %g in %d modules (%s)", self.rank, self.alpha,
                 sum(len(v) for v in self.layers.values()), ", ".join(self.layers))

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
        """lora.preserve_weight x the mean squared change the LoRA makes, on this micro-batch's noised latents, to
        the UNet's output (`word`, `token`) or to the difference the rest of a prompt makes to it (`edit`: "a <token>
        on a gray background" minus "a <token>"), against the model without the LoRA as the teacher (no class
        images): the LoRA learns what is particular to the token and leaves the rest of what prompts can say as it
        was. `edit` lets the LoRA change how the token draws, only not how the other words act on it. `context` needs
        no UNet pass: see _context_change."""
        if not self.preserve_weight or not self._params("unet")[0].requires_grad:
            return 0.0
        if self.preserve_with == "context":
            return self.preserve_weight * self._context_change()
        n = micro.noisy.shape[0]
        start = self.run.state.micro_step * n  # the prompts cycle with the micro-steps: the same on a resume
        prompts = [self.preserved[(start + i) % len(self.preserved)] for i in range(n)]
        pred, target = self._with_and_without(micro, prompts)
        if self.preserve_with == "edit":
            alone, alone_target = self._with_and_without(micro, [self.reference] * n)
            pred, target = pred - alone, target - alone_target
        return self.preserve_weight * nn.functional.mse_loss(pred.float(), target.float())

    def _with_and_without(self, micro, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's output for `prompts` on the micro-batch's noised latents with the LoRA (with gradients) and
        without it (the teacher)."""
        bb = self.run.backbone
        ids, noisy = self.run.input_ids(prompts), micro.noisy.to(bb.unet.dtype)
        with torch.no_grad():
            self._adapters(False)  # the model as it was
            try:
                target = bb.predict(noisy, micro.timesteps, ids, micro.batch)
            finally:
                self._adapters(True)
                for p in self.parameters():  # peft's switch also sets requires_grad; the phase decides that
                    p.requires_grad_(True)
        return bb.predict(noisy, micro.timesteps, ids, micro.batch), target

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
        """The LoRA in a file layout (LORA_FORMATS), fp32 on the CPU."""
        out = {}
        for owner, layers in self.layers.items():
            for path, layer in layers.items():
                down = layer.lora_A[ADAPTER].weight.detach().float().cpu().contiguous()
                up = layer.lora_B[ADAPTER].weight.detach().float().cpu().contiguous()
                path = canonical_path(owner, path)
                if fmt == "kohya":
                    name = f"{KOHYA_PREFIX[owner]}_{path.replace('.', '_')}"
                    out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                f"{name}.alpha": torch.tensor(self.alpha)})
                else:  # diffusers reads no alpha from a plain file (it assumes alpha = rank): fold the scale in
                    name = f"{DIFFUSERS_PREFIX[owner]}.{path}"
                    out.update({f"{name}.lora_A.weight": down,
                                f"{name}.lora_B.weight": (up * (self.alpha / self.rank)).contiguous()})
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
        written = {"lora": save_lora(run.run_dir / f"{stem}-lora.safetensors", lora,
                                     dict(meta, **{"tinv.lora_format": self.format}))}
        if self.bundle:
            bundled = bundle(kohya, run.output_name, self.token.vectors())  # A1111's word for it: the run's name
            written["lora_bundle"] = save_lora(run.run_dir / f"{stem}-bundle.safetensors", bundled,
                                               dict(meta, **{"tinv.lora_format": "kohya"}))
        return written


# ---- file helpers (tinv-convert split/join, readers) ---------------------------------------------------------------


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically; a NaN or inf is never written."""
    from safetensors.torch import save_file

    from .embedding import sort_metadata

    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise RuntimeError(f"refusing to write {path}: {key} holds NaN or inf")
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        sort_metadata(tmp)
    return Path(path)


def bundle(lora: dict[str, torch.Tensor], token: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA with the embedding bundled in, as A1111 reads it."""
    return {**lora, **{f"{BUNDLE_PREFIX}{token}.{key}": value.float().contiguous() for key, value in vectors.items()}}


def unbundle(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(the LoRA's own tensors, the bundled token, its vectors by encoder key) of a bundle file's tensors."""
    embedded: dict[str, dict[str, torch.Tensor]] = {}
    lora = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(BUNDLE_PREFIX)}(.+)\.(?:string_to_param\.)?({SD_KEY}|clip_l|clip_g|\*)", key)
        if m:
            embedded.setdefault(m.group(1), {})[SD_KEY if m.group(2) == "*" else m.group(2)] = value
        elif not key.startswith(BUNDLE_PREFIX):
            lora[key] = value
    if len(embedded) != 1:
        raise ConfigError(f"{where}: holds {len(embedded)} bundled embeddings ({', '.join(embedded) or 'none'}); "
                          "expected one, under bundle_emb.<token>.<emb_params|clip_l|clip_g>")
    (token, vectors), = embedded.items()
    if set(vectors) not in ({SD_KEY}, set(SDXL_KEYS)):
        raise ConfigError(f"{where}: the bundled {token!r} has keys {sorted(vectors)}; expected emb_params or "
                          "clip_l + clip_g")
    return lora, token, vectors


def to_kohya(tensors: dict[str, torch.Tensor], sdxl: bool, where: str) -> dict[str, torch.Tensor]:
    """A LoRA in either layout, as kohya's (a diffusers/peft-layout file has its scale folded in: alpha = rank)."""
    if not any(".lora_A." in k for k in tensors):
        return dict(tensors)
    owners = {"unet": "unet", "text_encoder": "clip_l" if sdxl else SD_KEY, "text_encoder_2": "clip_g"}
    out = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ConfigError(f"{where}: {key!r} is neither a kohya nor a diffusers LoRA key")
        owner, path, part = owners[m.group(1)], m.group(2), m.group(3)
        name = f"{KOHYA_PREFIX[owner]}_{canonical_path(owner, path).replace('.', '_')}"
        out[f"{name}.lora_{'down' if part == 'A' else 'up'}.weight"] = value
        if part == "A":
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file() or path.suffix != ".safetensors":
        raise ConfigError(f"{str(path)!r}: expected an existing .safetensors LoRA file")
    try:
        with safe_open(str(path), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - truncated, empty, a bad header: one line, whatever the cause
        raise ConfigError(f"{path}: not a readable safetensors file ({first_line(err)}); the file is broken or "
                          "not a LoRA: write it again or take another copy") from None
    bad = next((k for k, v in tensors.items() if not (v.is_floating_point() and torch.isfinite(v).all())), None)
    if bad is not None:
        raise ConfigError(f"{path}: {bad} is not finite floating-point weights ({tensors[bad].dtype}, NaN or "
                          "inf); the file is broken: write it again or take another copy")
    return tensors, metadata


def split_bundle(src: str | Path, embedding_out: str | Path, lora_out: str | Path,
                 embedding_format: str | None = None) -> tuple[Path, Path]:
    """A bundle -> its embedding (in any embedding format) and its plain kohya-layout LoRA."""
    from .convert import convert_vectors
    from .embedding import EmbeddingMeta

    tensors, metadata = read_safetensors(src)
    lora, token, vectors = unbundle(tensors, str(src))
    if not lora:
        raise ConfigError(f"{src}: holds a bundled embedding but no LoRA weights")
    lora_path = save_lora(Path(lora_out).expanduser(), lora, metadata)
    meta = EmbeddingMeta.from_header(metadata, token)
    return convert_vectors(vectors, meta, embedding_out, embedding_format), lora_path


def join_bundle(embedding: str | Path, lora_src: str | Path, out: str | Path, token: str | None = None) -> Path:
    """An embedding file and a LoRA file (kohya or diffusers layout) -> one A1111 bundle."""
    from .embedding import read_embedding

    loaded = read_embedding(embedding)
    tensors, metadata = read_safetensors(lora_src)
    if any(k.startswith(BUNDLE_PREFIX) for k in tensors):
        raise ConfigError(f"{lora_src}: is already a bundle; split it first (tinv-convert split)")
    name = token or loaded.name or Path(embedding).stem
    lora = to_kohya(tensors, set(loaded.vectors) == set(SDXL_KEYS), str(lora_src))
    meta = {**metadata, "tinv.token": name}
    return save_lora(Path(out).expanduser(), bundle(lora, name, {k: v.float() for k, v in loaded.vectors.items()}),
                     meta)


def load_into_pipeline(pipe, embedding: str | Path | None, lora: str | Path | None, scale: float = 1.0) -> bool:
    """Load a LoRA into a diffusers pipeline as users do (`load_lora_weights`): the `lora` file, else the LoRA a
    bundled `embedding` carries. Returns whether one was loaded."""
    source = lora if lora is not None else embedding
    if source is None or (lora is None and not (Path(source).suffix == ".safetensors" and Path(source).is_file())):
        return False
    tensors, _ = read_safetensors(source)
    if any(k.startswith(BUNDLE_PREFIX) for k in tensors):  # diffusers refuses bundle keys: hand it the LoRA
        tensors = unbundle(tensors, str(source))[0]
    elif lora is None:  # a plain embedding brings no LoRA
        return False
    pipe.load_lora_weights(tensors, adapter_name=ADAPTER)
    if scale != 1.0:
        pipe.set_adapters([ADAPTER], [scale])
    return True
