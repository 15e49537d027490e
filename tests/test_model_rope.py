"""The start-up RoPE check. The stand-in rotary module builds its cos/sin cache the way SGLang's
does (float32 positions x float32 frequencies from transformers' own RoPE init functions)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from radix_anchor.rope import UnsupportedRopeError, rotate
from sglang_kvcomm.model_rope import rope_for_model

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _config(head_dim=64, theta=1e5, **rope) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": theta, **rope},
    )


def _rotary(config: LlamaConfig, rotary_dim=None, neox=True) -> SimpleNamespace:
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        dim = config.head_dim
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    freqs = torch.arange(16384, dtype=torch.float32)[:, None] * inv_freq.float()[None]
    return SimpleNamespace(
        head_size=config.head_dim,
        rotary_dim=rotary_dim or config.head_dim,
        is_neox_style=neox,
        cos_sin_cache=torch.cat((freqs.cos(), freqs.sin()), dim=-1),
    )


def test_agrees_and_rotates_like_transformers():
    config = _config()
    spec = rope_for_model(config, _rotary(config))
    assert spec.layout == "neox" and spec.head_dim == 64
    keys = torch.randn(1, 3, 5, 64)  # HF layout [B, H, T, D], stored at position 0
    positions = torch.tensor([0, 1, 17, 300, 4000])
    angles = spec.angles(positions)
    cos = torch.cat((angles.cos(), angles.cos()), -1).float()[None]
    sin = torch.cat((angles.sin(), angles.sin()), -1).float()[None]
    _, hf_rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
    ours = rotate(keys[0].transpose(0, 1)[None], positions, spec)[0].transpose(0, 1)
    torch.testing.assert_close(ours, hf_rotated[0], rtol=1e-5, atol=1e-5)


def test_interleaved_layout_is_taken_from_the_model():
    config = _config()
    assert rope_for_model(config, _rotary(config, neox=False)).layout == "interleaved"


def test_llama3_scaling_agrees():
    config = _config(128, 5e5, **LLAMA3)
    assert rope_for_model(config, _rotary(config)).head_dim == 128


def test_mismatch_and_partial_rotary_are_refused():
    with pytest.raises(UnsupportedRopeError, match="cos/sin cache differs"):
        rope_for_model(_config(theta=1e4), _rotary(_config(theta=1e5)))
    with pytest.raises(UnsupportedRopeError, match="partial rotary"):
        rope_for_model(_config(), _rotary(_config(), rotary_dim=32))
    with pytest.raises(UnsupportedRopeError, match="yarn"):
        rope_for_model(
            _config(rope_type="yarn", factor=4.0, attention_factor=1.2), _rotary(_config())
        )
