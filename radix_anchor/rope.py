"""Moving stored post-RoPE keys to other positions.

RoPE rotates each channel pair of a key by ``position * inv_freq``; rotations compose, so a key
stored at position p becomes the key at p + d by one more rotation by ``d * inv_freq``. That is
exact only when RoPE is a pure rotation: plain, linear-scaled and Llama-3-scaled frequencies are;
YaRN with an attention factor, dynamic NTK (frequencies depend on the sequence length), LongRoPE,
multimodal RoPE, partial rotary and sliding-window layers are refused with the setting named.

Angles are computed in float64 and the rotation in float32 (or wider), whatever the key dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

Layout = Literal["neox", "interleaved"]


class UnsupportedRopeError(ValueError):
    """The model's positional encoding is not a pure rotation we can shift; names the setting."""


@dataclass(frozen=True)
class RopeSpec:
    """Per-pair inverse frequencies of a head (float64, length head_dim / 2) and the pair layout:
    ``neox`` pairs channel i with i + D/2 (Llama, Qwen2 in HF and SGLang), ``interleaved`` pairs
    2i with 2i + 1 (GPT-J style)."""

    inv_freq: torch.Tensor
    layout: Layout = "neox"

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_theta(cls, head_dim: int, theta: float, layout: Layout = "neox") -> RopeSpec:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return cls(1.0 / theta**exponents, layout)

    @classmethod
    def from_hf_config(cls, config: Any) -> RopeSpec:
        """Read a Hugging Face config (object or dict); raise UnsupportedRopeError if the model's
        RoPE is not a pure rotation of the whole head."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        _refuse_sliding_window(get)
        params = dict(get("rope_parameters") or get("rope_scaling") or {})
        if isinstance(params.get("full_attention"), Mapping):  # per-layer-type parameters
            raise UnsupportedRopeError("rope_parameters per layer type: layers use different RoPE")
        theta = params.get("rope_theta", get("rope_theta"))
        if theta is None:
            raise UnsupportedRopeError("config has no rope_theta")
        partial = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) or 1.0
        if partial != 1.0:
            raise UnsupportedRopeError(f"partial_rotary_factor={partial}: only full rotary heads")
        head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        spec = cls.from_theta(head_dim, float(theta))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind == "default":
            return spec
        if kind == "linear":
            return cls(spec.inv_freq / float(params["factor"]), spec.layout)
        if kind == "llama3":
            return cls(_llama3_scaled(spec.inv_freq, params, get), spec.layout)
        if kind == "yarn":
            factor = params.get("attention_factor") or params.get("mscale")
            raise UnsupportedRopeError(
                f"rope_type=yarn (attention_factor/mscale={factor}): scales cos/sin and blends "
                "frequencies, not a pure rotation"
            )
        raise UnsupportedRopeError(f"rope_type={kind!r} is not a pure rotation we can shift")

    def angles(self, delta: torch.Tensor) -> torch.Tensor:
        """[..., D/2] float64 angles for position deltas of any integer shape."""
        return delta.to(torch.float64)[..., None] * self._inv_freq_on(delta.device)

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The frequencies on ``device``, copied there once (a copy per call would synchronize
        the GPU on every rotation)."""
        copies = self.__dict__.setdefault("_copies", {})  # frozen: cache beside the fields
        if device not in copies:
            copies[device] = self.inv_freq.to(device)
        return copies[device]


def _refuse_sliding_window(get: Any) -> None:
    layer_types = get("layer_types") or ()
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedRopeError(f"layer_types={sorted(set(layer_types))}: sliding-window layers")
    if get("use_sliding_window") and get("sliding_window"):
        raise UnsupportedRopeError(
            f"use_sliding_window=True (sliding_window={get('sliding_window')}): "
            "sliding-window layers"
        )


def _llama3_scaled(inv_freq: torch.Tensor, params: Mapping, get: Any) -> torch.Tensor:
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = params.get("original_max_position_embeddings") or get("max_position_embeddings")
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(
    delta: torch.Tensor | int,
    spec: RopeSpec,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[D/2]`` (int delta) or ``[T, D/2]`` (``[T]`` deltas) of the shift, from
    float64 angles: what every rotation (torch or kernel) multiplies by."""
    angles = spec.angles(torch.as_tensor(delta, device=device))
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(keys: torch.Tensor, delta: torch.Tensor | int, spec: RopeSpec) -> torch.Tensor:
    """Keys ``[..., T, H, D]`` moved by ``delta`` positions (an int, or ``[T]`` per token).

    Returns a new tensor of the keys' dtype; the arithmetic is at least float32.
    """
    if keys.shape[-1] != spec.head_dim:
        raise ValueError(f"keys have head_dim {keys.shape[-1]}, RoPE spec has {spec.head_dim}")
    delta = torch.as_tensor(delta, device=keys.device)
    if delta.dim() == 1 and delta.numel() != keys.shape[-3]:
        raise ValueError(f"{delta.numel()} deltas for {keys.shape[-3]} tokens")
    compute = torch.promote_types(keys.dtype, torch.float32)
    cos, sin = cos_sin(delta, spec, keys.device, compute)  # [D/2] or [T, D/2]
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    x = keys.to(compute)
    half = spec.head_dim // 2
    if spec.layout == "neox":
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(keys.dtype)
