"""The served model's RoPE, checked at start-up: KVCOMM moves stored keys by rotating them, so
the model must use a pure rotation and our frequencies must be the ones SGLang computes with.

A model whose RoPE is not a pure rotation (YaRN with an attention factor, dynamic NTK, partial
rotary, sliding-window layers...) is refused here, with the setting named, rather than served
wrong KV later.
"""

from __future__ import annotations

from typing import Any

import torch

from radix_anchor.rope import RopeSpec, UnsupportedRopeError

_CHECK_POSITIONS = (1, 7, 100, 1000)


def rope_for_model(hf_config: Any, rotary: Any) -> RopeSpec:
    """``rotary``: SGLang's rotary embedding module (``head_size``, ``rotary_dim``,
    ``is_neox_style``, ``cos_sin_cache [max_pos, rotary_dim]`` = cat(cos, sin))."""
    spec = RopeSpec.from_hf_config(hf_config)
    if rotary.rotary_dim != rotary.head_size:
        raise UnsupportedRopeError(
            f"rotary_dim={rotary.rotary_dim} < head_size={rotary.head_size}: partial rotary"
        )
    if rotary.rotary_dim != spec.head_dim:
        raise UnsupportedRopeError(
            f"SGLang rotates {rotary.rotary_dim} channels, the config says {spec.head_dim}"
        )
    spec = RopeSpec(spec.inv_freq, "neox" if rotary.is_neox_style else "interleaved")
    cache = rotary.cos_sin_cache.detach().float().cpu()
    half = spec.head_dim // 2
    positions = [p for p in _CHECK_POSITIONS if p < cache.shape[0]]
    angles = spec.angles(torch.tensor(positions))
    expected = torch.cat((angles.cos(), angles.sin()), dim=-1).float()
    error = float((cache[positions, : 2 * half] - expected).abs().max())
    if error > 2e-3:
        raise UnsupportedRopeError(
            f"the model's cos/sin cache differs from the frequencies in its config by {error:.2e}"
            " (a RoPE variant this extension does not reproduce)"
        )
    return spec
