"""benchmarks/lm_qkv.py: the captured q/k/v are exactly what each layer's attention computed from.

The model is built tiny and untrained (no training in tests); the benchmark's checkpoint is not touched.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from longmoe.attention import flash_attention

_spec = importlib.util.spec_from_file_location(
    "lm_qkv", Path(__file__).resolve().parents[1] / "benchmarks" / "lm_qkv.py"
)
lm_qkv = importlib.util.module_from_spec(_spec)
sys.modules["lm_qkv"] = lm_qkv  # dataclasses look their module up while the class is being built
_spec.loader.exec_module(lm_qkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_reproduces_attention(dtype):
    cfg = lm_qkv.LMConfig(d_model=128, heads=2, head_dim=64, layers=3, ffn=192, context=64)
    model = lm_qkv.ByteLM(cfg).eval()
    tokens = torch.randint(0, 256, (1, 97 + 1))  # odd length: not a multiple of any tile
    attn_out = []  # the attention output each layer fed to its output projection, (1, S, heads * head_dim)
    hooks = [b.attn.wo.register_forward_pre_hook(lambda m, a: attn_out.append(a[0])) for b in model.blocks]
    qkv, bits = lm_qkv.capture_qkv(model, tokens, dtype=dtype)
    for h in hooks:
        h.remove()
    assert len(qkv) == cfg.layers and bits.shape == (97,)
    for (q, k, v), ref in zip(qkv, attn_out, strict=True):
        for t in (q, k, v):
            assert t.shape == (1, 97, cfg.heads, cfg.head_dim) and t.dtype == torch.float32
        # bf16 q/k/v are captured exactly (bf16 -> fp32 is lossless), so casting back reproduces the layer
        out = flash_attention(*(t.to(dtype) for t in (q, k, v)), causal=True).reshape(1, 97, -1)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert all(b.attn.capture is None for b in model.blocks)  # capture is switched off afterwards
    only = lm_qkv.capture_qkv(model, tokens, layer=1, dtype=dtype)[0]
    assert len(only) == 1 and torch.equal(only[0][0], qkv[1][0])


def test_rope_is_relative():
    """q.k after RoPE depends only on the position difference (so 32K capture is consistent with training)."""
    cos, sin = lm_qkv.rope_cos_sin(40000, 128, 500000.0)
    q, k = torch.randn(128, dtype=torch.float64), torch.randn(128, dtype=torch.float64)
    rot = lambda x, p: lm_qkv.apply_rope(
        x[None, None, None], cos[p : p + 1].double(), sin[p : p + 1].double()
    )
    near = (rot(q, 10) * rot(k, 3)).sum()
    far = (rot(q, 32007) * rot(k, 32000)).sum()
    torch.testing.assert_close(near, far, rtol=1e-5, atol=1e-5)  # fp32 cos/sin tables: ~1e-7 relative each


def test_training_is_a_fixed_step_count_and_reproducible(tmp_path):
    """Two runs with the same seed and step count give the same weights and the recorded step count."""
    cfg = lm_qkv.LMConfig(d_model=64, heads=1, head_dim=64, layers=1, ffn=192, context=32)
    states = []
    for run in range(2):
        rec = lm_qkv.train(cfg, steps=3, dtype="float32", out=tmp_path / str(run), quiet=True)
        assert rec["steps"] == 3 and rec["tokens"] == 3 * 32
        states.append(torch.load(tmp_path / str(run) / "model.pt", weights_only=True)["state_dict"])
    for name, p in states[0].items():
        assert torch.equal(p, states[1][name]), name
    with pytest.raises(ValueError, match="steps must be a positive int"):
        lm_qkv.train(cfg, steps=0, out=tmp_path / "x", quiet=True)


def test_planted_needles_are_recalled_later_and_keep_the_length():
    """Each needle's line is planted once and recalled once later (the recall, cue + needle + closing quote,
    has the same bytes as the plant); the window keeps its length; no line lands inside another."""
    import re

    text = torch.full((2049,), ord(" "), dtype=torch.long)
    out = lm_qkv.plant_needles(text, 3, torch.Generator().manual_seed(5))
    assert out.shape == text.shape and out.dtype == torch.long
    lines = re.findall(rb'\n[a-z]{6} = "[A-Za-z0-9]{16,32}"\n', bytes(out.tolist()))
    assert len(lines) == 6 and all(lines.count(x) == 2 for x in lines), lines
    assert torch.equal(lm_qkv.plant_needles(text, 0, torch.Generator()), text)


def test_staged_training_and_bad_stages(tmp_path):
    cfg = lm_qkv.LMConfig(d_model=64, heads=1, head_dim=64, layers=1, ffn=192, context=32)
    rec = lm_qkv.train(cfg, steps=3, dtype="float32", out=tmp_path, quiet=True, needle_prob=1.0,
                       stages=[(16, 2), (32, 1)])  # fmt: skip
    assert rec["tokens"] == 2 * 16 + 32 and rec["stages"] == [(16, 2), (32, 1)] and rec["needle_prob"] == 1.0
    for stages in ([(16, 2), (32, 2)], [(32, 2), (16, 1)], [(0, 1), (32, 2)]):
        with pytest.raises(ValueError, match="stages="):
            lm_qkv.train(cfg, steps=3, out=tmp_path, quiet=True, stages=stages)
    with pytest.raises(ValueError, match="needle_prob must be in"):
        lm_qkv.train(cfg, steps=3, out=tmp_path, quiet=True, needle_prob=1.5)
