"""XAttention's public functions reject bad input with an error that names the argument, its value and what
was expected: the estimator, block-sparse attention, xattention, the SDPA-shaped drop-in, true block mass
and threshold calibration."""

from __future__ import annotations

import pytest
import torch

from longmoe.attention.xattention import (
    block_sparse_attention,
    xattention,
    xattention_estimate,
    xattention_estimate_ref,
    xattention_sdpa,
)
from longmoe.attention.xattention_calibrate import calibrate_thresholds, true_block_mass

q, k, v = torch.randn(1, 64, 4, 16), torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16)
mask = torch.ones(1, 4, 4, 4, dtype=torch.bool)  # block_size 16
est = lambda **kw: xattention_estimate(q, k, **{"stride": 4, "block_size": 16, **kw})  # noqa: E731
sdpa_q, sdpa_k = q.transpose(1, 2), k.transpose(1, 2)

CASES = {
    # estimator (dispatching and reference)
    "q rank 3": (lambda: xattention_estimate(q[0], k), ValueError, r"must be 4-D .*\(64, 4, 16\)"),
    "k rank 5": (lambda: xattention_estimate_ref(q, k[None]), ValueError, r"must be 4-D .*\(1, 1, 64, 2, 16\)"),
    "batch mismatch": (
        lambda: xattention_estimate(q, torch.randn(2, 64, 2, 16)), ValueError, r"q \(1, 64, 4, 16\) and k \(2, 64, 2, 16\)"),
    "head_dim mismatch": (
        lambda: xattention_estimate(q, torch.randn(1, 64, 2, 8)), ValueError, r"share batch and head_dim"),
    "heads not divisible": (
        lambda: xattention_estimate(q, torch.randn(1, 64, 3, 16)), ValueError, r"heads_q=4 .* heads_kv=3"),
    "stride zero": (lambda: est(stride=0), ValueError, r"stride must be a positive int; got 0"),
    "stride float": (lambda: est(stride=4.0), ValueError, r"stride must be a positive int; got 4.0"),
    "block not multiple": (lambda: est(block_size=18), ValueError, r"block_size=18 .* multiple of stride=4"),
    "block zero": (lambda: est(block_size=0), ValueError, r"block_size=0"),
    "threshold zero": (lambda: est(threshold=0.0), ValueError, r"threshold must be in \(0, 1\]; got 0.0"),
    "threshold above one": (lambda: est(threshold=1.5), ValueError, r"threshold must be in \(0, 1\]; got 1.5"),
    "threshold string": (lambda: est(threshold="0.9"), ValueError, r"threshold must be in \(0, 1\]; got '0.9'"),
    "threshold tensor shape": (
        lambda: est(threshold=torch.full((3,), 0.9)), ValueError, r"shape \(heads_q,\) = \(4,\); got \(3,\)"),
    "threshold tensor value": (
        lambda: est(threshold=torch.tensor([0.9, 0.9, 0.0, 0.9])), ValueError, r"in \(0, 1\]; got \[0.89.*, 0.0, "),
    "threshold tensor nan": (
        lambda: est(threshold=torch.tensor([0.9, float("nan"), 0.9, 0.9])), ValueError, r"nan"),
    "q_offset negative": (lambda: est(q_offset=-1), ValueError, r"q_offset must be a non-negative int; got -1"),
    "softmax_scale zero": (lambda: est(softmax_scale=0.0), ValueError, r"softmax_scale .*; got 0.0"),
    "softmax_scale inf": (lambda: est(softmax_scale=float("inf")), ValueError, r"softmax_scale .*; got inf"),
    "softmax_scale bool": (lambda: est(softmax_scale=True), ValueError, r"softmax_scale .*; got True"),
    "sharpness zero": (lambda: est(sharpness=0.0), ValueError, r"sharpness must be a positive finite number; got 0.0"),
    "sharpness nan": (lambda: est(sharpness=float("nan")), ValueError, r"sharpness .*; got nan"),
    "sharpness bool": (lambda: xattention_estimate_ref(q, k, sharpness=True), ValueError, r"sharpness .*; got True"),
    "selection": (lambda: est(selection="topk"), ValueError, r"selection must be one of .*; got 'topk'"),
    "head_selection": (lambda: est(head_selection="all"), ValueError, r"head_selection .*; got 'all'"),
    "q/k dtype mix": (lambda: xattention_estimate(q, k.half()), ValueError, r"share dtype and device.*float16"),
    # block-sparse attention and xattention
    "block_mask not bool": (
        lambda: block_sparse_attention(q, k, v, block_mask=mask.float(), block_size=16), TypeError,
        r"block_mask must be a bool tensor; got torch.float32"),
    "block_mask shape": (
        lambda: block_sparse_attention(q, k, v, block_mask=mask[:, :, :3], block_size=16), ValueError,
        r"= \(1, 4, 4, 4\) for block_size=16; got \(1, 4, 3, 4\)"),
    "block_mask for 2 heads": (
        lambda: block_sparse_attention(q, k, v, block_mask=mask[:, :2], block_size=16), ValueError,
        r"= \(1, 4, 4, 4\) for block_size=16; got \(1, 2, 4, 4\)"),
    "block_size zero": (
        lambda: block_sparse_attention(q, k, v, block_mask=mask, block_size=0), ValueError, r"block_size.*0"),
    "xattention v shape": (
        lambda: xattention(q, k, v[:, :32], stride=4, block_size=16), ValueError, r"k and v must have the same shape"),
    "xattention threshold": (
        lambda: xattention(q, k, v, threshold=2, stride=4, block_size=16), ValueError, r"got 2"),
    # SDPA-shaped drop-in
    "sdpa query rank": (lambda: xattention_sdpa(sdpa_q[0], sdpa_k, sdpa_k), ValueError, r"query must be a 4-D"),
    "sdpa gqa flag": (lambda: xattention_sdpa(sdpa_q, sdpa_k, sdpa_k), ValueError, r"query heads 4 != key heads 2"),
    "sdpa mask and causal": (
        lambda: xattention_sdpa(sdpa_q, sdpa_k, sdpa_k, attn_mask=torch.ones(64, 64, dtype=torch.bool),
                                is_causal=True, enable_gqa=True), ValueError, r"attn_mask or is_causal"),  # fmt: skip
    "sdpa dropout": (
        lambda: xattention_sdpa(sdpa_q, sdpa_k, sdpa_k, dropout_p=0.5, enable_gqa=True), NotImplementedError,
        r"dropout_p=0.5"),
    # true block mass and calibration
    "mass block_size": (lambda: true_block_mass(q, k, block_size=0), ValueError, r"block_size .*; got 0"),
    "mass heads": (
        lambda: true_block_mass(q, torch.randn(1, 64, 3, 16), block_size=16), ValueError, r"heads_q=4 .* heads_kv=3"),
    "calibrate no samples": (lambda: calibrate_thresholds([], target_mass=0.9), ValueError, r"at least one \(q, k\) pair"),
    "calibrate not a pair": (lambda: calibrate_thresholds([q], target_mass=0.9), ValueError, r"samples\[0\] must be a \(q, k\) pair"),
    "calibrate both goals": (
        lambda: calibrate_thresholds([(q, k)], target_mass=0.9, density_budget=0.5), ValueError,
        r"exactly one of target_mass and density_budget; got target_mass=0.9, density_budget=0.5"),
    "calibrate target": (lambda: calibrate_thresholds([(q, k)], target_mass=1.5), ValueError, r"target_mass .*; got 1.5"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_argument(case):
    fn, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern):
        fn()
