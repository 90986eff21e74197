"""Single-file checkpoints in the original (CompVis / Stability) layout: reading them safely, telling their family
from their keys, and writing one from a diffusers pipeline (so tiny models can exercise the single-file path).

Reading goes through diffusers' own single-file conversion; writing is the inverse key mapping, done here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, first_line

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


# ---- reading ------------------------------------------------------------------------------------------------------

def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file loaded with weights_only=True (its code never runs)."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{what}={str(path)!r}: not a readable safetensors file ({first_line(err)})") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is not plain tensors
        raise ConfigError(f"{what}={str(path)!r}: refused to load - it is not a plain tensor file "
                          f"({first_line(err)}); only weights are loaded, never pickled code. Convert it to "
                          ".safetensors, or re-save it from a trusted source") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ConfigError(f"{what}={str(path)!r}: holds a {type(data).__name__}, not a state dict")
    return data



def checkpoint_family(keys) -> str | None:
    """sd1 / sd2 / sdxl from the text-encoder key prefixes, or None when the file holds no known text encoder."""
    keys = list(keys)
    for family in ("sdxl", "sd2", "sd1"):
        if any(k.startswith(TEXT_PREFIXES[family][-1]) for k in keys):
            return family
    return None


# ---- writing ------------------------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET[name]}.{tail}"


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    per = unet.config.layers_per_block + 1  # original blocks per level: the resnets (+attn) and a down/upsampler
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        top = next((name for name in _UNET_TOP if key.startswith(name + ".")), None)
        if top:
            new = _UNET_TOP[top] + key[len(top):]
        elif parts[0] in ("down_blocks", "up_blocks"):
            level, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if parts[0] == "down_blocks":
                if kind == "downsamplers":
                    new = f"input_blocks.{per * (level + 1)}.0.op.{'.'.join(parts[5:])}"
                else:
                    block = per * level + int(parts[3]) + 1
                    new = f"input_blocks.{block}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}"
            else:
                if kind == "upsamplers":
                    has_attention = bool(getattr(unet.up_blocks[level], "attentions", None))
                    new = f"output_blocks.{per * level + per - 1}.{2 if has_attention else 1}.{'.'.join(parts[4:])}"
                else:
                    block = per * level + int(parts[3])
                    new = f"output_blocks.{block}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}"
        elif parts[0] == "mid_block":
            index = int(parts[2])
            rest = ".".join(parts[3:])
            new = f"middle_block.{2 * index}.{_resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        else:
            raise ValueError(f"no original-layout name for UNet key {key}")
        out[UNET + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        side = parts[0]
        new = key
        if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2])
            level = level if side == "encoder" else levels - 1 - level
            group = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                name = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{group}.{level}.block.{parts[4]}.{name}"
            else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
                sampler = "downsample" if side == "encoder" else "upsample"
                new = f"{side}.{group}.{level}.{sampler}.{'.'.join(parts[5:])}"
        elif len(parts) > 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                name = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{name}"
            else:
                rest = ".".join(parts[4:])
                for src, dst in _VAE_ATTN.items():
                    if rest.startswith(src + "."):
                        rest = dst + rest[len(src):]
                        break
                new = f"{side}.mid.attn_1.{rest}"
                if value.ndim == 2:  # linear -> 1x1 conv
                    value = value[:, :, None, None]
        elif len(parts) > 1 and parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        out[VAE + new] = value
    return out


def hf_clip_to_original(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP in the transformers layout (SD1, SDXL encoder 1), with the `text_model.` prefix older files use."""
    out = {}
    for key, value in encoder.state_dict().items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out[prefix + name] = value
    return out


def openclip_to_original(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP in OpenCLIP's layout (SD2, SDXL encoder 2): fused q/k/v, resblocks, [width, proj] text projection."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    else:  # SD2 files carry a projection that the model does not use
        width = state["final_layer_norm.weight"].shape[0]
        out[prefix + "text_projection"] = torch.eye(width)
    for i in range(encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def pipeline_to_original(pipe, family: str) -> dict[str, torch.Tensor]:
    state = {**unet_to_original(pipe.unet), **vae_to_original(pipe.vae)}
    if family == "sd1":
        state.update(hf_clip_to_original(pipe.text_encoder, TEXT_PREFIXES["sd1"][0]))
    elif family == "sd2":
        state.update(openclip_to_original(pipe.text_encoder, TEXT_PREFIXES["sd2"][0]))
    else:
        state.update(hf_clip_to_original(pipe.text_encoder, TEXT_PREFIXES["sdxl"][0]))
        state.update(openclip_to_original(pipe.text_encoder_2, TEXT_PREFIXES["sdxl"][1]))
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_single_file(pipe, family: str, path: str | Path) -> Path:
    from safetensors.torch import save_file

    from ..atomic import atomic_path

    path = Path(path).expanduser()
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(pipeline_to_original(pipe, family), str(tmp))
        else:
            torch.save({"state_dict": pipeline_to_original(pipe, family)}, str(tmp))
    return path
