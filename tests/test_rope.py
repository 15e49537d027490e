"""RoPE shift of stored keys against float64 references and against real models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from radix_anchor.rope import RopeSpec, UnsupportedRopeError, rotate

LAYOUTS = ("neox", "interleaved")


def _spec(layout: str, head_dim: int = 64, theta: float = 1e4) -> RopeSpec:
    return RopeSpec.from_theta(head_dim, theta, layout)


def _reference_rotate(keys: torch.Tensor, delta: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """float64 complex multiplication: pair (a, b) is a + ib, rotated by exp(i * delta * f)."""
    x = keys.double()
    half = spec.head_dim // 2
    if spec.layout == "neox":
        z = torch.complex(x[..., :half], x[..., half:])
    else:
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    angle = delta.double()[:, None, None] * spec.inv_freq  # [T, 1, D/2]
    z = z * torch.exp(1j * angle)
    if spec.layout == "neox":
        return torch.cat((z.real, z.imag), dim=-1)
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_complex_reference(layout):
    spec = _spec(layout)
    keys = torch.randn(3, 17, 4, 64, dtype=torch.float64)
    delta = torch.randint(-5000, 5000, (17,))
    got = rotate(keys, delta, spec)
    torch.testing.assert_close(got, _reference_rotate(keys, delta, spec), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shift_composes(layout):
    spec = _spec(layout)
    keys = torch.randn(2, 9, 3, 64, dtype=torch.float64)
    a, b = torch.randint(-3000, 3000, (9,)), torch.randint(-3000, 3000, (9,))
    torch.testing.assert_close(
        rotate(rotate(keys, a, spec), b, spec), rotate(keys, a + b, spec), rtol=1e-10, atol=1e-10
    )
    k32 = keys.float()
    torch.testing.assert_close(
        rotate(rotate(k32, 1234, spec), 777, spec), rotate(k32, 2011, spec), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shift_then_unshift_is_identity(layout, dtype):
    spec = _spec(layout, head_dim=128, theta=5e5)
    keys = torch.randn(4, 33, 8, 128, dtype=dtype)
    back = rotate(rotate(keys, 4096, spec), -4096, spec)
    rel = (back - keys).norm() / keys.norm()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-12)
    assert back.dtype == dtype


def test_half_precision_keys_keep_dtype_and_rotate_in_fp32():
    spec = _spec("neox")
    keys = torch.randn(1, 5, 2, 64).to(torch.bfloat16)
    out = rotate(keys, 100, spec)
    assert out.dtype == torch.bfloat16
    ref = _reference_rotate(keys.double(), torch.full((5,), 100), spec)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2  # bf16 output rounding only


def test_bad_shapes_are_refused():
    spec = _spec("neox")
    with pytest.raises(ValueError, match="head_dim"):
        rotate(torch.zeros(1, 4, 2, 32), 1, spec)
    with pytest.raises(ValueError, match="3 deltas for 4 tokens"):
        rotate(torch.zeros(1, 4, 2, 64), torch.tensor([1, 2, 3]), spec)


def _llama_config(**rope) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        head_dim=128,
        max_position_embeddings=131072,
        rope_parameters=rope,
    )


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_frequencies_match_transformers(rope):
    config = _llama_config(**rope)
    expected, scaling = ROPE_INIT_FUNCTIONS.get(rope["rope_type"], _default_init)(config, "cpu")
    assert scaling == 1.0  # a pure rotation
    spec = RopeSpec.from_hf_config(config)
    torch.testing.assert_close(spec.inv_freq.float(), expected.float(), rtol=1e-6, atol=0)


def _default_init(config, device):
    base = config.rope_parameters["rope_theta"]
    dim = config.head_dim
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim), 1.0


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "rope_theta": 1e4,
                    "factor": 4.0,
                    "attention_factor": 1.2,
                }
            },
            "rope_type=yarn",
        ),
        (
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
            "rope_type='dynamic'",
        ),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope'"),
        (
            {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor=0.5",
        ),
        (
            {
                "rope_parameters": {"rope_theta": 1e4},
                "use_sliding_window": True,
                "sliding_window": 4096,
            },
            "use_sliding_window=True",
        ),
        (
            {
                "rope_parameters": {"rope_theta": 1e4},
                "layer_types": ["sliding_attention", "full_attention"],
            },
            "layer_types",
        ),
    ],
)
def test_non_rotations_are_refused_with_the_setting_named(config, named):
    config = {"head_dim": 64, **config}
    with pytest.raises(UnsupportedRopeError, match=named.replace("[", r"\[")):
        RopeSpec.from_hf_config(config)


@pytest.mark.parametrize("model", ["smollm2", "qwen2.5-coder-0.5b"])
def test_real_keys_rotate_to_recomputed_keys_on_every_layer(hf_models, model):
    m = hf_models(model)
    ids = m.encode("Janet's ducks lay 16 eggs per day. She eats three for breakfast.")
    shift = 211
    at_zero = m.prefill(ids, start=0).kv
    at_shift = m.prefill(ids, start=shift).kv
    rotated = rotate(at_zero.k, shift, m.rope)
    layers = at_zero.k.shape[0]
    assert layers == m.config.num_hidden_layers
    for layer in range(layers):
        ref = at_shift.k[layer]
        err = float((rotated[layer] - ref).norm() / ref.norm())
        naive = float((at_zero.k[layer] - ref).norm() / ref.norm())
        assert err < 1e-5, (layer, err)  # fp32 recomputation noise
        assert naive > 1e-2, (layer, naive)  # the shift is not a no-op
        vals = float((at_zero.v[layer] - at_shift.v[layer]).norm() / at_shift.v[layer].norm())
        assert vals < 1e-5  # values carry no position
