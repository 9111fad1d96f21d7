"""Hugging Face drop-in (``attn_implementation="longmoe_xattention"`` / ``"longmoe_dense"``) and the
SDPA-shaped ``xattention_sdpa``, on a tiny Llama built from a config (no download)."""

import pytest
import torch
import torch.nn.functional as F

from longmoe.attention import flash_attention_ref
from longmoe.attention.hf import register_hf_attention, set_xattention_thresholds  # noqa: E402
from longmoe.attention.xattention import xattention_estimate, xattention_sdpa
from tests.oracle import assert_within_oracle, attention64, max_err

# fp32 logits of O(1) through 2 layers: our kernels and SDPA differ only in summation order (measured 2.4e-7);
# 1e-5 is ~80 ulp, far below any mask or scale bug (those move logits by O(1e-2)).
ATOL = 1e-5


def _models(impl, qk_gain=1.0, seqlen=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    register_hf_attention()
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    ref = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    if qk_gain != 1.0:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "q_proj" in name or "k_proj" in name:
                    p.mul_(qk_gain)
    ours = LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 128, (2, seqlen))
    return ref, ours, ids


@torch.no_grad()
def test_dense_equals_sdpa():
    ref, ours, ids = _models("longmoe_dense", seqlen=100)
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_xattention_threshold_one_equals_sdpa_and_generates():
    ref, ours, ids = _models("longmoe_xattention")
    set_xattention_thresholds(ours, 1.0, stride=4, block_size=16)
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
    # An all-ones padding mask is the plain causal mask; greedy decoding with a KV cache matches SDPA.
    mask = torch.ones_like(ids)
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids).logits, atol=ATOL, rtol=0)
    prompt = ids[:, :40]
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))


def _replay_attention(masks, oracle):
    """A transformers attention function that replays the block masks ``masks`` recorded from our run, one
    per call in order, as plain masked attention: the fp64 oracle (tests/oracle.py) or the library's
    same-dtype reference (``flash_attention_ref(upcast=False)``). Causal (bottom-right), GQA by index."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (b, s, h, d)
        mask, block_size = masks.pop(0)
        kw = dict(causal=True, softmax_scale=scaling, block_mask=mask, block_size=block_size)
        out = attention64(q, k, v, **kw)[0] if oracle else flash_attention_ref(q, k, v, upcast=False, **kw)[0]
        return out.to(query.dtype), None

    return attend


@torch.no_grad()
def test_xattention_sparse_equals_masked_reference(monkeypatch):
    """The drop-in's sparse logits equal plain masked attention with the same block masks (replayed per
    layer), within the fp32 reference's own error of the fp64 oracle; and tiles really were dropped."""
    from transformers import AttentionInterface

    import longmoe.attention.hf as hf

    # Random init gives near-uniform attention, where τ = 0.9 keeps every tile; scaling the q/k projections
    # by 8 makes attention peaked, so selection really drops tiles.
    ref, ours, ids = _models("longmoe_xattention", qk_gain=8.0)
    per_layer = {"model.layers.0.self_attn": torch.full((4,), 0.9), 1: torch.full((4,), 0.9)}
    set_xattention_thresholds(ours, per_layer, stride=4, block_size=16)
    recorded, real = [], hf.xattention

    def recording(q, k, v, **kw):
        est = {n: kw[n] for n in ("stride", "block_size", "threshold", "causal", "softmax_scale", "selection",
                                  "head_selection", "sharpness")}  # fmt: skip
        recorded.append((xattention_estimate(q, k, **est)[1], kw["block_size"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf, "xattention", recording)
    out = ours(ids).logits
    assert len(recorded) == 2 and all(not bool(m.all()) for m, _ in recorded), "no tile was dropped"
    for name, oracle in (("longmoe_test_replay64", True), ("longmoe_test_replay32", False)):
        AttentionInterface.register(name, _replay_attention(list(recorded), oracle))
    ref.config._attn_implementation = "longmoe_test_replay32"
    same = ref(ids).logits
    ref.double().config._attn_implementation = "longmoe_test_replay64"
    oracle = ref(ids).logits
    assert_within_oracle("sparse logits", out, same, oracle, torch.float32)
    # The masks matter: the sparse logits differ from dense attention by far more than that bound.
    ref.config._attn_implementation = "sdpa"
    dense = ref(ids).logits
    assert max_err(out, dense) > 100 * (2 * max_err(same, oracle) + 1e-5)


@torch.no_grad()
def test_padding_mask_raises():
    _, ours, ids = _models("longmoe_xattention", seqlen=40)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with pytest.raises(NotImplementedError, match="padding"):
        ours(ids, attention_mask=mask)


def test_set_thresholds_bad_inputs():
    _, ours, _ = _models("longmoe_xattention", seqlen=8)
    with pytest.raises(ValueError, match="names no attention module"):
        set_xattention_thresholds(ours, {"model.layers.7.self_attn": 0.9})
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        set_xattention_thresholds(ours, torch.full((3,), 0.9))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        set_xattention_thresholds(ours, 1.5)
    with pytest.raises(ValueError, match=r"sharpness must be a positive finite number; got -2.0"):
        set_xattention_thresholds(ours, 0.9, sharpness=-2.0)
    with pytest.raises(ValueError, match="default"):
        set_xattention_thresholds(ours, {0: 0.9})


@pytest.mark.parametrize("lq,lk", [(70, 70), (33, 70), (70, 33)])
def test_xattention_sdpa_threshold_one_equals_sdpa(lq, lk):
    q = torch.randn(2, 4, lq, 16, requires_grad=True)
    k = torch.randn(2, 2, lk, 16, requires_grad=True)
    v = torch.randn(2, 2, lk, 16, requires_grad=True)
    for causal in (True, False):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        out = xattention_sdpa(
            q, k, v, is_causal=causal, enable_gqa=True, threshold=1.0, stride=4, block_size=16
        )
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # fp32 grads of O(10) sums: ~1e-5 observed
    # An explicit boolean causal mask is recognised.
    tri = torch.ones(lq, lk, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=tri, enable_gqa=True)
    out = xattention_sdpa(q, k, v, attn_mask=tri, enable_gqa=True, threshold=1.0, stride=4, block_size=16)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_xattention_sdpa_bad_inputs():
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        xattention_sdpa(q, k, k)
    with pytest.raises(NotImplementedError, match="dropout"):
        xattention_sdpa(q, k, k, enable_gqa=True, dropout_p=0.1)
    band = torch.ones(32, 32, dtype=torch.bool).tril() & ~torch.ones(32, 32, dtype=torch.bool).tril(-8)
    with pytest.raises(NotImplementedError, match="causal mask"):
        xattention_sdpa(q, k, k, attn_mask=band, enable_gqa=True)
