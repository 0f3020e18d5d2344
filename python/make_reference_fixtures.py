#!/usr/bin/env python3
"""Generate the PyTorch reference fixtures for the C++ MoE block implementations.

Run by hand (torch is NOT a CI dependency; the outputs are committed):

    /usr/bin/python3 python/make_reference_fixtures.py [--out tests/fixtures]

For every case it writes tests/fixtures/<case>/ with
  config.json              HF-style config of the family
  model.safetensors        (or model-0000i-of-00002.safetensors + model.safetensors.index.json)
                           only the MoE-block tensors of every layer under their exact HF names,
                           dense MLP tensors for the non-MoE layers, plus one irrelevant tensor
                           (model.embed_tokens.weight)
  input.safetensors        hidden_states [T,H] F32
  expected.safetensors     for every MoE layer L: output.{L} [T,H] F32 (MoE block output, no
                           residual), topk_ids.{L} [T,k] I32, topk_weights.{L} [T,k] F32.
                           Each layer's block is applied to the SAME input hidden_states.
                           topk order = descending selection score (torch.topk sorted=True).

The reference math below is transcribed from Hugging Face transformers' modeling code
(class names cited in each function) and is evaluated in float32, as HF does for the
router (and for the experts when the weights are float32). Weights stored as BF16/F16 on
disk are widened exactly to float32 before computing. Every result is re-computed in
float64 as a cross-check. Inputs are re-drawn token by token until every routing decision
has a margin > 1e-3 so that another float32 implementation cannot flip an expert choice.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as stio  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 24  # tokens
H = 64  # hidden size
VOCAB = 32  # rows of the irrelevant embedding tensor
MARGIN = 1e-3  # minimum gap between a kept and a dropped routing candidate
F64_RTOL = 1e-5  # ||out32 - out64|| / ||out64||


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
def randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float32) * std


def lin(g, out_f, in_f, scale=1.0):
    """nn.Linear weight [out, in] ~ N(0, scale/sqrt(in)) so activations stay O(1)."""
    return randn(g, out_f, in_f, std=scale / math.sqrt(in_f))


def round_to(t, st_dtype):
    """Round a float32 tensor to the on-disk dtype and widen it back (exactly) to float32."""
    if st_dtype == "F32":
        return t.clone()
    if st_dtype == "BF16":
        return t.to(torch.bfloat16).to(torch.float32)
    if st_dtype == "F16":
        return t.to(torch.float16).to(torch.float32)
    raise ValueError(st_dtype)


def to_disk(t, st_dtype):
    """float32 torch tensor (already representable in st_dtype) -> numpy array for the writer."""
    if st_dtype == "F32":
        return t.detach().numpy().astype(np.float32)
    if st_dtype == "F16":
        return t.to(torch.float16).numpy()
    if st_dtype == "BF16":
        bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        # cross-check torch's rounding against safetensors_io's numpy rounding
        assert np.array_equal(bits, stio.float32_to_bf16_bits(t.numpy())), "bf16 rounding mismatch"
        return bits
    raise ValueError(st_dtype)


def swiglu(x, w_gate, w_up, w_down):
    """HF *MLP.forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn = SiLU."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def combine(x, topk_ids, topk_weights, n_experts, expert_fn):
    """HF's expert loop (MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock / DeepseekV3MoE.moe):
    one-hot mask, loop over experts in ascending index, index_add_ the weighted outputs."""
    out = torch.zeros_like(x)
    expert_mask = F.one_hot(topk_ids, num_classes=n_experts).permute(2, 1, 0)  # [E, k, T]
    for e in range(n_experts):
        pos, tok = torch.where(expert_mask[e])
        if tok.numel() == 0:
            continue
        y = expert_fn(e, x[tok]) * topk_weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def kth_gap(scores, k):
    """Per-row gap between the k-th and (k+1)-th largest value."""
    s = torch.sort(scores, dim=-1, descending=True).values
    return s[:, k - 1] - s[:, k]


def n_experts_of(cfg):
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if key in cfg:
            return cfg[key]
    raise KeyError("expert count")


# ----------------------------------------------------------------------------------------
# Mixtral  (MixtralSparseMoeBlock, MixtralTopKRouter / MixtralBlockSparseTop2MLP)
# ----------------------------------------------------------------------------------------
class Mixtral:
    @staticmethod
    def moe_layers(cfg):
        return list(range(cfg["num_hidden_layers"]))

    @staticmethod
    def build(cfg, g):
        E, I = cfg["num_local_experts"], cfg["intermediate_size"]
        W = {}
        for L in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{L}.block_sparse_moe."
            W[p + "gate.weight"] = lin(g, E, H)
            for e in range(E):
                W[p + f"experts.{e}.w1.weight"] = lin(g, I, H)  # gate
                W[p + f"experts.{e}.w2.weight"] = lin(g, H, I)  # down
                W[p + f"experts.{e}.w3.weight"] = lin(g, I, H)  # up
        return W

    @staticmethod
    def forward(cfg, W, L, x):
        p = f"model.layers.{L}.block_sparse_moe."
        E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
        router_logits = F.linear(x, W[p + "gate.weight"])
        probs = F.softmax(router_logits, dim=-1, dtype=x.dtype)  # float (x is f32/f64)
        top_v, top_i = torch.topk(probs, k, dim=-1)
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)  # always renormalised, no epsilon

        def expert(e, xs):
            q = p + f"experts.{e}."
            return swiglu(xs, W[q + "w1.weight"], W[q + "w3.weight"], W[q + "w2.weight"])

        out = combine(x, top_i, top_v, E, expert)
        return dict(out=out, ids=top_i, weights=top_v, margin=kth_gap(probs, k), diag={})


# ----------------------------------------------------------------------------------------
# Qwen2-MoE (Qwen2MoeSparseMoeBlock) and Qwen3-MoE (Qwen3MoeSparseMoeBlock)
# ----------------------------------------------------------------------------------------
class QwenMoe:
    @staticmethod
    def moe_layers(cfg):
        # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer
        step = cfg.get("decoder_sparse_step", 1)
        only = cfg.get("mlp_only_layers", [])
        return [L for L in range(cfg["num_hidden_layers"]) if L not in only and (L + 1) % step == 0]

    @staticmethod
    def build(cfg, g):
        E, I = n_experts_of(cfg), cfg["moe_intermediate_size"]
        Is = cfg.get("shared_expert_intermediate_size", 0)
        moe = QwenMoe.moe_layers(cfg)
        W = {}
        for L in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{L}.mlp."
            if L not in moe:  # dense Qwen2MoeMLP(intermediate_size=config.intermediate_size)
                Id = cfg["intermediate_size"]
                W[p + "gate_proj.weight"] = lin(g, Id, H)
                W[p + "up_proj.weight"] = lin(g, Id, H)
                W[p + "down_proj.weight"] = lin(g, H, Id)
                continue
            W[p + "gate.weight"] = lin(g, E, H)
            for e in range(E):
                W[p + f"experts.{e}.gate_proj.weight"] = lin(g, I, H)
                W[p + f"experts.{e}.up_proj.weight"] = lin(g, I, H)
                W[p + f"experts.{e}.down_proj.weight"] = lin(g, H, I)
            if Is:
                W[p + "shared_expert.gate_proj.weight"] = lin(g, Is, H)
                W[p + "shared_expert.up_proj.weight"] = lin(g, Is, H)
                W[p + "shared_expert.down_proj.weight"] = lin(g, H, Is)
                W[p + "shared_expert_gate.weight"] = lin(g, 1, H)
        return W

    @staticmethod
    def forward(cfg, W, L, x):
        p = f"model.layers.{L}.mlp."
        E, k = n_experts_of(cfg), cfg["num_experts_per_tok"]
        router_logits = F.linear(x, W[p + "gate.weight"])
        probs = F.softmax(router_logits, dim=1, dtype=x.dtype)
        top_v, top_i = torch.topk(probs, k, dim=-1)
        if cfg.get("norm_topk_prob", False):
            top_v = top_v / top_v.sum(dim=-1, keepdim=True)

        def expert(e, xs):
            q = p + f"experts.{e}."
            return swiglu(xs, W[q + "gate_proj.weight"], W[q + "up_proj.weight"], W[q + "down_proj.weight"])

        out = combine(x, top_i, top_v, E, expert)
        diag = {}
        if p + "shared_expert_gate.weight" in W:  # Qwen2-MoE only
            q = p + "shared_expert."
            shared = swiglu(x, W[q + "gate_proj.weight"], W[q + "up_proj.weight"], W[q + "down_proj.weight"])
            gate = torch.sigmoid(F.linear(x, W[p + "shared_expert_gate.weight"]))  # [T,1]
            out = out + gate * shared
            diag["shared_gate_range"] = (float(gate.min()), float(gate.max()))
        return dict(out=out, ids=top_i, weights=top_v, margin=kth_gap(probs, k), diag=diag)


# ----------------------------------------------------------------------------------------
# DeepSeek-V3 (DeepseekV3MoE, DeepseekV3TopkRouter) and DeepSeek-V2 (DeepseekV2Moe)
# ----------------------------------------------------------------------------------------
class DeepSeek:
    @staticmethod
    def moe_layers(cfg):
        # HF DeepseekV3DecoderLayer / DeepseekV2DecoderLayer only test
        # layer_idx >= first_k_dense_replace; moe_layer_freq (=1 here) is the DeepSeek
        # convention and is honoured too.
        fk, freq = cfg["first_k_dense_replace"], cfg.get("moe_layer_freq", 1)
        return [L for L in range(cfg["num_hidden_layers"]) if L >= fk and L % freq == 0]

    @staticmethod
    def build(cfg, g, v3, bias_std=0.1):
        E, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        Is = I * cfg["n_shared_experts"]
        moe = DeepSeek.moe_layers(cfg)
        W = {}
        for L in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{L}.mlp."
            if L not in moe:  # dense DeepseekV3MLP(config) with config.intermediate_size
                Id = cfg["intermediate_size"]
                W[p + "gate_proj.weight"] = lin(g, Id, H)
                W[p + "up_proj.weight"] = lin(g, Id, H)
                W[p + "down_proj.weight"] = lin(g, H, Id)
                continue
            W[p + "gate.weight"] = lin(g, E, H)
            if v3:
                W[p + "gate.e_score_correction_bias"] = randn(g, E, std=bias_std)
            for e in range(E):
                W[p + f"experts.{e}.gate_proj.weight"] = lin(g, I, H)
                W[p + f"experts.{e}.up_proj.weight"] = lin(g, I, H)
                W[p + f"experts.{e}.down_proj.weight"] = lin(g, H, I)
            W[p + "shared_experts.gate_proj.weight"] = lin(g, Is, H)
            W[p + "shared_experts.up_proj.weight"] = lin(g, Is, H)
            W[p + "shared_experts.down_proj.weight"] = lin(g, H, Is)
        return W

    @staticmethod
    def _finish(cfg, W, p, x, top_i, top_w):
        E = cfg["n_routed_experts"]

        def expert(e, xs):
            q = p + f"experts.{e}."
            return swiglu(xs, W[q + "gate_proj.weight"], W[q + "up_proj.weight"], W[q + "down_proj.weight"])

        out = combine(x, top_i, top_w, E, expert)
        q = p + "shared_experts."
        # no gate on DeepSeek's shared experts
        return out + swiglu(x, W[q + "gate_proj.weight"], W[q + "up_proj.weight"], W[q + "down_proj.weight"])

    @staticmethod
    def group_mask(group_scores, topk_group, n_group, E):
        """HF: topk(group_scores, topk_group, sorted=False) -> scatter -> expand to experts."""
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(group_scores)
        gmask.scatter_(1, group_idx, 1)
        return gmask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)

    @staticmethod
    def forward_v3(cfg, W, L, x):
        """DeepseekV3TopkRouter.forward / get_topk_indices + DeepseekV3MoE.forward."""
        p = f"model.layers.{L}.mlp."
        E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        G, TG = cfg["n_group"], cfg["topk_group"]
        router_logits = F.linear(x, W[p + "gate.weight"])
        scores = router_logits.sigmoid()
        scores_for_choice = scores + W[p + "gate.e_score_correction_bias"].to(x.dtype).unsqueeze(0)
        # group score = sum of the two largest biased scores of the group
        group_scores = scores_for_choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        score_mask = DeepSeek.group_mask(group_scores, TG, G, E)
        # HF fills the dropped groups with 0.0 (not -inf); the margin check below makes the
        # k-th kept score exceed 0 by > MARGIN, so a -inf fill selects the same experts.
        masked = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
        # HF uses sorted=False; we store descending order (the block output is order-free).
        top_i = torch.topk(masked, k=k, dim=-1, sorted=True)[1]
        top_w = scores.gather(1, top_i)  # unbiased sigmoid scores
        if cfg["norm_topk_prob"]:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        top_w = top_w * cfg["routed_scaling_factor"]
        out = DeepSeek._finish(cfg, W, p, x, top_i, top_w)
        margin = torch.minimum(kth_gap(masked, k), kth_gap(group_scores, TG))
        # diagnostics: does the bias / the group limit change the choice for some tokens?
        plain = torch.topk(scores, k, dim=-1)[1].sort(-1).values
        biased = torch.topk(scores_for_choice, k, dim=-1)[1].sort(-1).values
        chosen = top_i.sort(-1).values
        diag = dict(
            tokens_changed_by_bias=int((plain != biased).any(-1).sum()),
            tokens_changed_by_group_limit=int((biased != chosen).any(-1).sum()),
            tokens_changed_vs_plain_topk=int((plain != chosen).any(-1).sum()),
            negative_biased_scores=int((scores_for_choice < 0).sum()),
        )
        return dict(out=out, ids=top_i, weights=top_w, margin=margin, diag=diag)

    @staticmethod
    def forward_v2(cfg, W, L, x):
        """DeepseekV2Moe.route_tokens_to_experts (DeepseekV2MoEGate.forward in 4.5x) + forward.

        HF's port differs from DeepSeek's own modeling_deepseek.py: it NEVER renormalises the
        top-k weights (config.norm_topk_prob is stored but unused) and ALWAYS multiplies them
        by routed_scaling_factor. (DeepSeek's own code does: if top_k > 1 and norm_topk_prob:
        w /= sum(w) + 1e-20, else: w *= routed_scaling_factor.) The fixture sets
        norm_topk_prob = true so that it pins HF's behaviour: weights = p_topk * rsf.
        """
        p = f"model.layers.{L}.mlp."
        E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        G, TG = cfg["n_group"], cfg["topk_group"]
        router_logits = F.linear(x, W[p + "gate.weight"])
        probs = router_logits.softmax(dim=-1, dtype=x.dtype)
        method = cfg["topk_method"]
        if method == "greedy":
            masked = probs
            margin = kth_gap(probs, k)
        elif method == "group_limited_greedy":
            group_scores = probs.view(-1, G, E // G).max(dim=-1).values  # group score = its max
            score_mask = DeepSeek.group_mask(group_scores, TG, G, E)
            masked = probs.masked_fill(~score_mask.bool(), 0.0)
            margin = torch.minimum(kth_gap(masked, k), kth_gap(group_scores, TG))
        else:
            raise ValueError(method)
        top_w, top_i = torch.topk(masked, k=k, dim=-1, sorted=True)  # HF: sorted=False
        top_w = top_w * cfg["routed_scaling_factor"]
        out = DeepSeek._finish(cfg, W, p, x, top_i, top_w)
        plain = torch.topk(probs, k, dim=-1)[1].sort(-1).values
        diag = dict(tokens_changed_by_group_limit=int((plain != top_i.sort(-1).values).any(-1).sum()))
        return dict(out=out, ids=top_i, weights=top_w, margin=margin, diag=diag)


class DeepSeekV3(DeepSeek):
    build = staticmethod(lambda cfg, g: DeepSeek.build(cfg, g, v3=True))
    forward = staticmethod(DeepSeek.forward_v3)


class DeepSeekV2(DeepSeek):
    build = staticmethod(lambda cfg, g: DeepSeek.build(cfg, g, v3=False))
    forward = staticmethod(DeepSeek.forward_v2)


# ----------------------------------------------------------------------------------------
# GPT-OSS (GptOssMLP, GptOssTopKRouter, GptOssExperts)
# ----------------------------------------------------------------------------------------
class GptOss:
    GATE_UP_SCALE = 3.0  # larger gate/up pre-activations so the +-7 clamp is exercised

    @staticmethod
    def moe_layers(cfg):
        return list(range(cfg["num_hidden_layers"]))

    @staticmethod
    def build(cfg, g):
        E, I = cfg["num_local_experts"], cfg["intermediate_size"]
        W = {}
        for L in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{L}.mlp."
            W[p + "router.weight"] = lin(g, E, H)
            W[p + "router.bias"] = randn(g, E, std=0.5)
            # stored [in, out]: y = x @ W (+ b); gate = columns 0,2,4..., up = columns 1,3,5...
            W[p + "experts.gate_up_proj"] = randn(g, E, H, 2 * I, std=GptOss.GATE_UP_SCALE / math.sqrt(H))
            W[p + "experts.gate_up_proj_bias"] = randn(g, E, 2 * I, std=0.5)
            W[p + "experts.down_proj"] = randn(g, E, I, H, std=1.0 / math.sqrt(I))
            W[p + "experts.down_proj_bias"] = randn(g, E, H, std=0.1)
        return W

    @staticmethod
    def forward(cfg, W, L, x):
        p = f"model.layers.{L}.mlp."
        E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
        limit, alpha = cfg["swiglu_limit"], 1.702
        # GptOssTopKRouter.forward
        router_logits = F.linear(x, W[p + "router.weight"], W[p + "router.bias"])
        top_v, top_i = torch.topk(router_logits, k, dim=-1)  # sorted, on the raw logits
        top_v = F.softmax(top_v, dim=1, dtype=top_v.dtype)  # softmax over the k chosen only
        routing_weights = torch.zeros_like(router_logits).scatter_(1, top_i, top_v)  # [T,E]
        # GptOssExperts.forward, inference branch (all experts, weight 0 for unchosen ones)
        hs = x.repeat(E, 1).view(E, -1, H)
        gate_up = torch.bmm(hs, W[p + "experts.gate_up_proj"]) + W[p + "experts.gate_up_proj_bias"][..., None, :]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        sel = routing_weights.transpose(0, 1) > 0  # [E,T] for diagnostics only
        diag = dict(
            gate_clamped=int((gate > limit)[sel].sum()),
            up_clamped=int((up.abs() > limit)[sel].sum()),
            of=int(sel.sum()) * gate.shape[-1],
        )
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        glu = gate * torch.sigmoid(gate * alpha)
        nxt = torch.bmm((up + 1) * glu, W[p + "experts.down_proj"]) + W[p + "experts.down_proj_bias"][..., None, :]
        nxt = nxt * routing_weights.transpose(0, 1)[..., None]  # bias is weighted too
        out = nxt.sum(dim=0)
        return dict(out=out, ids=top_i, weights=top_v, margin=kth_gap(router_logits, k), diag=diag)


# ----------------------------------------------------------------------------------------
# quantized releases: block-scaled FP8 (DeepSeek-V3, Qwen3 FP8) and MXFP4 (GPT-OSS)
# ----------------------------------------------------------------------------------------
def e4m3_decode(codes):
    """OCP FP8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    c = np.asarray(codes, dtype=np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp, mant = (c >> 3) & 0xF, c & 0x7
    mag = np.where(exp == 0, mant / 8.0 * 2.0 ** -6, (1 + mant / 8.0) * 2.0 ** (exp - 7.0))
    return np.where((exp == 15) & (mant == 7), np.nan, sign * mag).astype(np.float32)


E4M3 = e4m3_decode(np.arange(256))
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def nearest_code(x, table):
    """Index of the nearest finite table value for every element of x (ties: lower index)."""
    finite = np.where(np.isfinite(table))[0]
    d = np.abs(x.reshape(-1, 1) - table[finite].reshape(1, -1))
    return finite[np.argmin(d, axis=1)].reshape(x.shape).astype(np.uint8)


def fp8_block_quantize(w, block):
    """w [rows, cols] float32 -> (e4m3 codes, scale_inv [ceil(rows/br), ceil(cols/bc)]):
    each block scaled so that its largest magnitude maps to 448, as DeepSeek's quantizer does."""
    rows, cols = w.shape
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    q = np.zeros((rows, cols), np.uint8)
    scale = np.zeros(grid, np.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = np.float32(max(float(np.abs(blk).max()), 1e-12) / 448.0)
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = nearest_code(blk / s, E4M3)
    return q, scale


def fp8_block_dequant(q, scale_inv, block):
    """Transcribed from DeepSeek-V3 inference/kernel.py weight_dequant: y = x · s per block."""
    rows, cols = q.shape
    br, bc = block
    s = np.repeat(np.repeat(scale_inv, br, axis=0), bc, axis=1)[:rows, :cols]
    return (E4M3[q] * s).astype(np.float32)


def mxfp4_quantize(w_out_major):
    """[..., rows, cols] float32 -> (blocks [..., rows, cols/32, 16] u8, scales [..., rows, cols/32] u8).
    OCP MX: shared exponent floor(log2(amax)) - 2 (FP4's largest exponent), values rounded to FP4."""
    *prefix, rows, cols = w_out_major.shape
    g = w_out_major.reshape(*prefix, rows, cols // 32, 32)
    amax = np.maximum(np.abs(g).max(axis=-1), 2.0 ** -100)
    exp = np.floor(np.log2(amax)).astype(np.int64) - 2
    codes = nearest_code(g / np.ldexp(1.0, exp)[..., None], FP4_VALUES)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8)


def mxfp4_dequant(blocks, scales):
    """Transcribed from transformers' integrations/mxfp4.py convert_moe_packed_tensors
    (float32 here; its products are exact in bfloat16 too): [..., G, 16] -> [..., G·32], then the
    transpose(1, 2) that turns the packed output-major rows into GPT-OSS's [E, in, out]."""
    exp = scales.astype(np.int32) - 127
    *prefix, G, B = blocks.shape
    out = np.empty((*prefix, G, B * 2), np.float32)
    out[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    out = np.ldexp(out, exp[..., None]).astype(np.float32)
    return out.reshape(*prefix, G * B * 2).transpose(0, 2, 1).copy()


def quantize(case, W):
    """Replaces the weights a quantized release stores packed by their dequantized values;
    returns (W, packed tensors for disk, names they replace)."""
    quant, cfg = case.get("quant"), case["cfg"]
    W = dict(W)
    disk, replaced = {}, set()
    if quant == "fp8":
        block = cfg["quantization_config"]["weight_block_size"]
        for name in [n for n in W if n.endswith("_proj.weight")]:
            q, s = fp8_block_quantize(W[name].numpy(), block)
            disk[name] = stio.Raw(q, "F8_E4M3")
            disk[name + "_scale_inv"] = s
            W[name] = torch.from_numpy(fp8_block_dequant(q, s, block))
    elif quant == "mxfp4":
        for name in [n for n in W if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj")]:
            blocks, scales = mxfp4_quantize(W[name].numpy().transpose(0, 2, 1))  # [E, out, in]
            disk[name + "_blocks"], disk[name + "_scales"] = blocks, scales
            replaced.add(name)
            W[name] = torch.from_numpy(mxfp4_dequant(blocks, scales))
    return W, disk, replaced


def dequantize_loaded(W, cfg):
    """The inverse for verification: F32 tensors under the names the forward passes use."""
    for name in [n for n in W if n.endswith("_scale_inv")]:
        weight = name[: -len("_scale_inv")]
        scale = W.pop(name).numpy()
        block = cfg["quantization_config"]["weight_block_size"]
        W[weight] = torch.from_numpy(fp8_block_dequant(W[weight].numpy().astype(np.uint8), scale, block))
    for name in [n for n in W if n.endswith("_blocks")]:
        stem = name[: -len("_blocks")]
        blocks = W.pop(name).numpy().astype(np.uint8)
        scales = W.pop(stem + "_scales").numpy().astype(np.uint8)
        W[stem] = torch.from_numpy(mxfp4_dequant(blocks, scales))
    return W


# ----------------------------------------------------------------------------------------
# transformers 5's run-time layout (save_pretrained(save_original_format=False)): per layer
# experts.gate_up_proj [E, 2I, H] = cat(stack(gate), stack(up), dim=1) and experts.down_proj
# [E, H, I] = stack(down) (its conversion_mapping: MergeModulelist(dim=0), Concatenate(dim=1));
# Mixtral's block_sparse_moe is renamed mlp.
# ----------------------------------------------------------------------------------------
PROJ_NAMES = {"mixtral": ("w1", "w3", "w2")}


def fuse_v5(disk, cfg):
    gate, up, down = PROJ_NAMES.get(cfg["model_type"], ("gate_proj", "up_proj", "down_proj"))
    E = n_experts_of(cfg)
    out = {}
    stems = sorted({n.rsplit(".experts.", 1)[0] for n in disk if ".experts." in n})
    for stem in stems:
        def stacked(proj):
            arrays = [disk[f"{stem}.experts.{e}.{proj}.weight"] for e in range(E)]
            return np.stack(arrays, axis=0)
        new_stem = stem.replace(".block_sparse_moe", ".mlp")
        out[new_stem + ".experts.gate_up_proj"] = np.concatenate([stacked(gate), stacked(up)], axis=1)
        out[new_stem + ".experts.down_proj"] = stacked(down)
    for n, a in disk.items():
        if ".experts." in n and any(s + ".experts." in n for s in stems):
            continue
        out[n.replace(".block_sparse_moe.", ".mlp.")] = a
    return out


def unfuse_v5(W, cfg):
    """The inverse, for verification: back to the per-expert names the forward passes use."""
    gate, up, down = PROJ_NAMES.get(cfg["model_type"], ("gate_proj", "up_proj", "down_proj"))
    block = "block_sparse_moe" if cfg["model_type"] == "mixtral" else "mlp"
    out = {}
    for n, t in W.items():
        n2 = n.replace(".mlp.", f".{block}.") if cfg["model_type"] == "mixtral" else n
        if n.endswith(".experts.gate_up_proj"):
            stem = n2[: -len(".gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{stem}.{e}.{gate}.weight"] = t[e, :inter].clone()
                out[f"{stem}.{e}.{up}.weight"] = t[e, inter:].clone()
        elif n.endswith(".experts.down_proj"):
            stem = n2[: -len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{stem}.{e}.{down}.weight"] = t[e].clone()
        else:
            out[n2] = t
    return out


FAMILIES = {
    "mixtral": Mixtral,
    "qwen2_moe": QwenMoe,
    "qwen3_moe": QwenMoe,
    "deepseek_v3": DeepSeekV3,
    "deepseek_v2": DeepSeekV2,
    "gpt_oss": GptOss,
}


# ----------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------
def base_cfg(model_type, arch, n_layers, torch_dtype):
    return {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": H,
        "num_hidden_layers": n_layers,
        "vocab_size": VOCAB,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "torch_dtype": torch_dtype,
    }


def mixtral_cfg(torch_dtype):
    c = base_cfg("mixtral", "MixtralForCausalLM", 2, torch_dtype)
    c.update(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0)
    return c


def qwen3_cfg(torch_dtype, experts_key):
    c = base_cfg("qwen3_moe", "Qwen3MoeForCausalLM", 2, torch_dtype)
    c.update({experts_key: 8})
    c.update(num_experts_per_tok=4, moe_intermediate_size=16, intermediate_size=40,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return c


def deepseek_cfg(model_type, arch, n_layers, **kw):
    c = base_cfg(model_type, arch, n_layers, "float32")
    c.update(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
             intermediate_size=40, n_shared_experts=1, n_group=4, topk_group=2,
             first_k_dense_replace=1, moe_layer_freq=1)
    c.update(kw)
    return c


CASES = [
    dict(name="mixtral", family="mixtral", seed=1001, dtype="F32", cfg=mixtral_cfg("float32")),
    dict(name="mixtral_bf16", family="mixtral", seed=1002, dtype="BF16", cfg=mixtral_cfg("bfloat16"),
         bf16_input=True),
    dict(name="qwen2_moe", family="qwen2_moe", seed=1003, dtype="F32",
         cfg=dict(base_cfg("qwen2_moe", "Qwen2MoeForCausalLM", 3, "float32"),
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=40,
                  shared_expert_intermediate_size=48, norm_topk_prob=False,
                  decoder_sparse_step=1, mlp_only_layers=[0])),
    dict(name="qwen3_moe", family="qwen3_moe", seed=1004, dtype="F16", cfg=qwen3_cfg("float16", "num_experts")),
    # same weights/input/expected as qwen3_moe (the F16 values are stored exactly as F32)
    dict(name="qwen3_moe_sharded", family="qwen3_moe", seed=1004, dtype="F32",
         cfg=qwen3_cfg("float32", "num_local_experts"), weights_dtype="F16", shards=2),
    dict(name="deepseek_v3", family="deepseek_v3", seed=1005, dtype="F32",
         cfg=deepseek_cfg("deepseek_v3", "DeepseekV3ForCausalLM", 3, routed_scaling_factor=2.5,
                          norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc")),
    dict(name="deepseek_v2", family="deepseek_v2", seed=1006, dtype="F32",
         cfg=deepseek_cfg("deepseek_v2", "DeepseekV2ForCausalLM", 2, routed_scaling_factor=16.0,
                          n_shared_experts=2, norm_topk_prob=True, scoring_func="softmax",
                          topk_method="group_limited_greedy")),
    dict(name="gpt_oss", family="gpt_oss", seed=1007, dtype="F32",
         cfg=dict(base_cfg("gpt_oss", "GptOssForCausalLM", 2, "float32"),
                  num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, swiglu_limit=7.0)),
    # As DeepSeek releases V3: every projection F8_E4M3 with float32 block scales, the router
    # BF16. Blocks of 16 x 24 (the release uses 128 x 128) so that a 64-wide matrix has
    # several blocks per row and partial blocks at its edges.
    dict(name="deepseek_v3_fp8", family="deepseek_v3", seed=1008, dtype="BF16", quant="fp8",
         cfg=deepseek_cfg("deepseek_v3", "DeepseekV3ForCausalLM", 3, routed_scaling_factor=2.5,
                          norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
                          torch_dtype="bfloat16",
                          quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                               "quant_method": "fp8", "weight_block_size": [16, 24]})),
    # As OpenAI releases GPT-OSS: expert projections MXFP4 (_blocks, _scales), the rest BF16.
    dict(name="gpt_oss_mxfp4", family="gpt_oss", seed=1009, dtype="BF16", quant="mxfp4",
         cfg=dict(base_cfg("gpt_oss", "GptOssForCausalLM", 2, "bfloat16"),
                  num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, swiglu_limit=7.0,
                  quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                      "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                      "lm_head"]})),
    # transformers 5's run-time layout, as save_pretrained(save_original_format=False) writes it
    dict(name="mixtral_fused", family="mixtral", seed=1010, dtype="BF16", layout="v5",
         cfg=mixtral_cfg("bfloat16")),
    dict(name="deepseek_v3_fused", family="deepseek_v3", seed=1011, dtype="BF16", layout="v5",
         cfg=deepseek_cfg("deepseek_v3", "DeepseekV3ForCausalLM", 3, routed_scaling_factor=2.5,
                          norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
                          torch_dtype="bfloat16")),
]


# ----------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------
def run_layers(fam, cfg, W, x):
    return {L: fam.forward(cfg, W, L, x) for L in fam.moe_layers(cfg)}


def robust_input(fam, cfg, W, g, bf16_too):
    """Draw hidden_states; re-draw the tokens whose routing margin is <= MARGIN in any layer."""
    x = randn(g, T, H)
    for it in range(10000):
        views = [x] + ([round_to(x, "BF16")] if bf16_too else [])
        m = torch.stack([r["margin"] for v in views for r in run_layers(fam, cfg, W, v).values()]).min(0).values
        bad = m <= MARGIN
        if not bad.any():
            return x, it, float(m.min())
        x[bad] = randn(g, int(bad.sum()), H)
    raise RuntimeError("could not find a robust input")


def check_f64(fam, cfg, W, x, res32):
    W64 = {k: v.double() for k, v in W.items()}
    res64 = run_layers(fam, cfg, W64, x.double())
    worst = 0.0
    for L, r in res32.items():
        r64 = res64[L]
        assert torch.equal(r["ids"], r64["ids"]), f"layer {L}: f64 routing differs"
        for key in ("out", "weights"):
            a, b = r[key].double(), r64[key]
            rel = float((a - b).norm() / b.norm())
            assert rel < F64_RTOL, f"layer {L} {key}: f32 vs f64 rel err {rel}"
            worst = max(worst, rel)
    return worst


def expected_tensors(res):
    out = {}
    for L, r in res.items():
        out[f"output.{L}"] = r["out"].numpy().astype(np.float32)
        out[f"topk_ids.{L}"] = r["ids"].numpy().astype(np.int32)
        out[f"topk_weights.{L}"] = r["weights"].numpy().astype(np.float32)
    return out


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_checkpoint(folder, disk, shards):
    if shards == 1:
        stio.save_file(disk, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = list(disk)
    # split in the middle of a layer's experts so the loader must follow the weight_map per tensor
    cut = len(names) // 2
    parts = [names[:cut], names[cut:]]
    weight_map, files, total = {}, [], 0
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        stio.save_file({n: disk[n] for n in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += disk[n].nbytes
        files.append(fname)
    write_json(os.path.join(folder, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return files + ["model.safetensors.index.json"]


def make_case(case, out_root):
    fam = FAMILIES[case["family"]]
    cfg = case["cfg"]
    g = torch.Generator().manual_seed(case["seed"])
    # weights are drawn in float32, rounded to the on-disk dtype and widened back exactly
    wdtype = case.get("weights_dtype", case["dtype"])
    W = {k: round_to(v, wdtype) for k, v in fam.build(cfg, g).items()}
    W, packed, replaced = quantize(case, W)
    embed = round_to(randn(g, VOCAB, H), wdtype)
    x, redraws, min_margin = robust_input(fam, cfg, W, g, case.get("bf16_input", False))

    res = run_layers(fam, cfg, W, x)
    worst = check_f64(fam, cfg, W, x, res)

    folder = os.path.join(out_root, case["name"])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    write_json(os.path.join(folder, "config.json"), cfg)
    disk = {"model.embed_tokens.weight": to_disk(embed, case["dtype"])}
    disk.update({k: packed[k] if k in packed else to_disk(v, "F32" if k.endswith("e_score_correction_bias") else case["dtype"])
                 for k, v in W.items() if k not in replaced})
    disk.update({k: v for k, v in packed.items() if k not in disk})
    if case.get("layout") == "v5":
        disk = fuse_v5(disk, cfg)
    write_checkpoint(folder, disk, case.get("shards", 1))

    moe = fam.moe_layers(cfg)
    meta = {"generator": "python/make_reference_fixtures.py", "case": case["name"],
            "model_type": cfg["model_type"], "moe_layers": ",".join(map(str, moe)),
            "topk_order": "descending selection score", "torch": torch.__version__}
    stio.save_file({"hidden_states": x.numpy().astype(np.float32)},
                   os.path.join(folder, "input.safetensors"), metadata={"format": "pt"})
    stio.save_file(expected_tensors(res), os.path.join(folder, "expected.safetensors"), metadata=meta)

    diags = {L: r["diag"] for L, r in res.items()}
    # the fixture must exercise the family's special paths (bias, group limit, clamp)
    for key in ("tokens_changed_by_bias", "tokens_changed_by_group_limit", "gate_clamped", "up_clamped"):
        if key in diags[moe[0]]:
            assert sum(d[key] for d in diags.values()) > 0, f"{case['name']}: {key} never happens"
    if case.get("bf16_input", False):
        xb = round_to(x, "BF16")
        res_b = run_layers(fam, cfg, W, xb)
        worst = max(worst, check_f64(fam, cfg, W, xb, res_b))
        stio.save_file({"hidden_states": to_disk(xb, "BF16")},
                       os.path.join(folder, "input_bf16.safetensors"), metadata={"format": "pt"})
        stio.save_file(expected_tensors(res_b), os.path.join(folder, "expected_bf16_input.safetensors"),
                       metadata=dict(meta, input="input_bf16.safetensors widened exactly to float32"))
    return dict(name=case["name"], moe=moe, redraws=redraws, min_margin=min_margin, f64=worst,
                diags=diags, out_rms=[float(r["out"].pow(2).mean().sqrt()) for r in res.values()])


# ----------------------------------------------------------------------------------------
# verification: re-read everything from disk and recompute
# ----------------------------------------------------------------------------------------
def load_checkpoint(folder):
    idx = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    W = {}
    for fname in files:
        tensors, dtypes, _ = stio.load_file(os.path.join(folder, fname))
        for n, a in tensors.items():
            W[n] = torch.from_numpy(stio.to_float32(a, dtypes[n]).copy())
    return W


def verify_case(case, out_root):
    folder = os.path.join(out_root, case["name"])
    fam = FAMILIES[case["family"]]
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    W = dequantize_loaded(load_checkpoint(folder), cfg)
    if case.get("layout") == "v5":
        W = unfuse_v5(W, cfg)
    pairs = [("input.safetensors", "expected.safetensors")]
    if case.get("bf16_input", False):
        pairs.append(("input_bf16.safetensors", "expected_bf16_input.safetensors"))
    for inp, exp in pairs:
        t, d, _ = stio.load_file(os.path.join(folder, inp))
        x = torch.from_numpy(stio.to_float32(t["hidden_states"], d["hidden_states"]).copy())
        assert x.shape == (T, H)
        e, ed, _ = stio.load_file(os.path.join(folder, exp))
        res = run_layers(fam, cfg, W, x)
        assert sorted(e) == sorted(expected_tensors(res)), "expected tensor names"
        for L, r in res.items():
            assert ed[f"output.{L}"] == "F32" and ed[f"topk_ids.{L}"] == "I32"
            assert np.array_equal(e[f"topk_ids.{L}"], r["ids"].numpy().astype(np.int32))
            assert np.allclose(e[f"output.{L}"], r["out"].numpy(), rtol=0, atol=1e-6)
            assert np.allclose(e[f"topk_weights.{L}"], r["weights"].numpy(), rtol=0, atol=1e-7)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "tests", "fixtures"))
    args = ap.parse_args()
    torch.manual_seed(0)  # nothing below uses the global RNG; every case has its own generator
    torch.set_num_threads(1)  # deterministic float32 reductions
    os.makedirs(args.out, exist_ok=True)
    for case in CASES:
        s = make_case(case, args.out)
        verify_case(case, args.out)
        print(f"{s['name']:18s} moe_layers={s['moe']} redraw_rounds={s['redraws']} "
              f"min_margin={s['min_margin']:.4f} f32_vs_f64={s['f64']:.2e} "
              f"out_rms={['%.3f' % v for v in s['out_rms']]}")
        for L, d in s["diags"].items():
            if d:
                print(f"{'':18s} layer {L}: {d}")
    total = 0
    for case in CASES:
        folder = os.path.join(args.out, case["name"])
        for fname in sorted(os.listdir(folder)):
            size = os.path.getsize(os.path.join(folder, fname))
            total += size
            print(f"  {case['name']}/{fname}: {size} bytes")
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
