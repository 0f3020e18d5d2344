#!/usr/bin/env python3
"""Hugging Face transformers' sparse MoE blocks on one GPU: the baseline for our CUDA kernels.

Builds the real transformers 5.x blocks -- MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock and
DeepseekV3MoE, each from its own config class at the real model's sizes (one hidden layer, small
vocabulary; nothing but the block is built) -- in BF16 on the GPU, with fresh random weights
(N(0, 1/fan_in) for every weight, routers included; DeepSeek-V3's e_score_correction_bias small,
random and FP32 as the checkpoints keep it), and times, for every token count T:

  layer    the whole block's forward on hidden states [1, T, H] (router, experts, shared expert);
  experts  the experts module alone, experts(hidden_states [T, H], top_k_index, top_k_weights),
           on the top-k the block's own router chose for that input, computed once, untimed;

under each experts implementation transformers can dispatch to (config._experts_implementation,
read by the @use_experts_implementation decorator at every call): "grouped_mm" (torch's grouped
GEMM) and "eager" (the Python loop over the experts that were hit). The block is built once per
shape; switching the implementation is a config attribute.

Timing is triton.testing.do_bench's: calls for --warmup-ms, then max(5, --rep-ms / estimate)
calls, each between its own pair of CUDA events; the median is reported. Calls rotate among 4
different inputs so none finds its input in L2. The eager loop syncs with the host, so its times
include its Python and launch overhead, which is what it costs.

Output (stdout and --out), one JSON object a line:
  {"device": ..., "torch": ..., "transformers": ..., ...}
  {"ceiling": "matmul_bf16_tflops", "value": ...}  torch.mm, 8192^3, BF16
  {"ceiling": "d2d_copy_gbs", "value": ...}        copy_ of 1 GiB, bytes read + bytes written
  {"shape": ..., "block": ..., "H": ..., "I": ..., "E": ..., "k": ..., "I_shared": ...}
  {"shape", "impl", "part": "layer"|"experts", "T", "ms", "tflops", "weight_gbs", "experts_touched"}
  {"shape": ..., "check": "grouped_mm_vs_eager", "T": 64, "rel_err": ...}
  {"shape": ..., "impl": ..., "error": ...}        an implementation missing or failing
tflops counts the expert FFNs, 2*T*k*3*H*I (+ 2*T*3*H*I_shared for DeepSeek-V3's shared expert
in "layer"); the router's GEMM is not counted. weight_gbs is the BF16 weight bytes of the distinct
experts the router picked (mean over the 4 inputs; + the shared expert in "layer") per second.

Run (on an H100/H200 with PyTorch >= 2.9 and transformers 5.x; no network needed):
  python3 bench/gpu/hf_moe_bench.py --out $OUT/hf.jsonl

Targets for our kernels against these numbers: >= 1.0x grouped_mm at every T, and >= 5x eager
at T >= 512.
"""

import argparse
import contextlib
import gc
import importlib
import json
import statistics
import sys

import torch
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

BF16 = torch.bfloat16
N_INPUTS = 4  # inputs rotated between calls

# name -> (transformers.models.<module>, config class, sparse MoE block class, config values)
SHAPES = {
    "mixtral": ("mixtral", "MixtralConfig", "MixtralSparseMoeBlock", dict(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", dict(
        hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE", dict(
        hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
        n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=0)),
}
SMALL = dict(num_hidden_layers=1, vocab_size=1024)


def bench_ms(fn, warmup_ms, rep_ms):
    """Median milliseconds of one call fn(i), i = 0, 1, 2, ... (triton.testing.do_bench's method)."""
    fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        fn(i)
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for i in range(max(1, int(warmup_ms / estimate_ms))):
        fn(i)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(5, int(rep_ms / estimate_ms)))]
    for i, (before, after) in enumerate(events):
        before.record()
        fn(i)
        after.record()
    torch.cuda.synchronize()
    return statistics.median([before.elapsed_time(after) for before, after in events])


def tflops(flops, ms):
    return flops / ms / 1e9  # flops / (ms * 1e-3 s) / 1e12


def gbs(nbytes, ms):
    return nbytes / ms / 1e6  # bytes / (ms * 1e-3 s) / 1e9


def ceilings(args, emit):
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=BF16) for _ in range(2))
    c = torch.empty_like(a)
    ms = bench_ms(lambda i: torch.mm(a, b, out=c), args.warmup_ms, args.rep_ms)
    emit({"ceiling": "matmul_bf16_tflops", "value": round(tflops(2 * n**3, ms), 1), "ms": round(ms, 4),
          "mnk": n})
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda i: dst.copy_(src), args.warmup_ms, args.rep_ms)
    emit({"ceiling": "d2d_copy_gbs", "value": round(gbs(2 * src.numel(), ms), 1), "ms": round(ms, 4),
          "bytes_copied": src.numel()})


@contextlib.contextmanager
def default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build(name, seed):
    """The block for one shape, on the GPU in BF16, weights random like real ones. (config, block)."""
    module, config_class, block_class, values = SHAPES[name]
    config = getattr(transformers, config_class)(**SMALL, **values)
    block_class = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"),
                          block_class)
    torch.manual_seed(seed)
    with torch.device("cuda"), default_dtype(BF16):  # allocated in BF16 directly: no FP32 copy
        block = block_class(config)
    with torch.no_grad():
        for p in block.parameters():  # every weight is [..., out, in]: fan_in is the last dim
            p.normal_(0.0, p.shape[-1] ** -0.5)
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek-V3's selection bias; FP32 in the checkpoints
            bias.data = 0.01 * torch.randn(bias.shape, device="cuda", dtype=torch.float32)
    return config, block.eval()


def dims(config, block):
    """(H, I, E, k, I_shared) from the experts' weights: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    E, two_i, H = block.experts.gate_up_proj.shape
    I = two_i // 2
    if tuple(block.experts.down_proj.shape) != (E, H, I):
        raise RuntimeError(f"unexpected experts layout: gate_up_proj {tuple(block.experts.gate_up_proj.shape)}, "
                           f"down_proj {tuple(block.experts.down_proj.shape)}")
    shared = getattr(block, "shared_experts", None)
    return H, I, E, config.num_experts_per_tok, shared.gate_proj.out_features if shared is not None else 0


def route(block, x2d):
    """(top_k_index, top_k_weights) for x2d [T, H], computed exactly as the block's forward does."""
    out = block.gate(x2d)
    if hasattr(block, "route_tokens_to_experts"):  # DeepSeek-V3: the gate returns the logits
        return block.route_tokens_to_experts(out)
    _, weights, indices = out  # Mixtral / Qwen3-MoE TopKRouter: (logits, weights, indices)
    return indices, weights


def set_impl(config, block, impl):
    if impl != "eager" and impl not in ALL_EXPERTS_FUNCTIONS:
        raise KeyError(f"{impl!r} is not an experts implementation of transformers {transformers.__version__}")
    config._experts_implementation = impl
    if block.experts.config._experts_implementation != impl:
        raise RuntimeError("the experts module does not read config._experts_implementation")


def first(out):
    return out[0] if isinstance(out, tuple) else out


def make_inputs(T, H, seed):
    """N_INPUTS hidden states [1, T, H], the same for every implementation."""
    g = torch.Generator(device="cuda").manual_seed(seed + T)
    return [torch.randn(1, T, H, generator=g, device="cuda", dtype=BF16) for _ in range(N_INPUTS)]


def run_impl(name, config, block, impl, args, emit):
    H, I, E, k, I_shared = dims(config, block)
    set_impl(config, block, impl)
    for T in args.tokens:
        xs = make_inputs(T, H, args.seed)
        routes = [route(block, x.view(-1, H)) for x in xs]
        touched = statistics.mean(indices.unique().numel() for indices, _ in routes)
        expert_flops, expert_bytes = 2 * T * k * 3 * H * I, touched * 3 * H * I * 2
        parts = (
            ("layer", lambda i: block(xs[i % N_INPUTS]),
             expert_flops + 2 * T * 3 * H * I_shared, expert_bytes + 3 * H * I_shared * 2),
            ("experts", lambda i: block.experts(xs[i % N_INPUTS].view(-1, H), *routes[i % N_INPUTS]),
             expert_flops, expert_bytes),
        )
        for part, fn, flops, nbytes in parts:
            ms = bench_ms(fn, args.warmup_ms, args.rep_ms)
            emit({"shape": name, "impl": impl, "part": part, "T": T, "ms": round(ms, 4),
                  "tflops": round(tflops(flops, ms), 2), "weight_gbs": round(gbs(nbytes, ms), 1),
                  "experts_touched": touched})


def check(name, config, block, args, emit):
    """Relative norm error of the grouped_mm block's output against the eager one, T = 64."""
    x = make_inputs(64, config.hidden_size, args.seed)[0]
    out = {}
    for impl in ("eager", "grouped_mm"):
        set_impl(config, block, impl)
        out[impl] = first(block(x)).float()
    rel_err = (out["grouped_mm"] - out["eager"]).norm() / out["eager"].norm()
    emit({"shape": name, "check": "grouped_mm_vs_eager", "T": 64, "rel_err": float(f"{rel_err.item():.3g}")})


def error_text(e):
    return f"{type(e).__name__}: {e}"


def run_shape(name, args, emit):
    try:
        config, block = build(name, args.seed)
        H, I, E, k, I_shared = dims(config, block)
    except Exception as e:
        for impl in args.impls:
            emit({"shape": name, "impl": impl, "error": "building the block: " + error_text(e)})
        return
    emit({"shape": name, "block": type(block).__name__, "experts": type(block.experts).__name__,
          "H": H, "I": I, "E": E, "k": k, "I_shared": I_shared})
    for impl in args.impls:
        try:
            run_impl(name, config, block, impl, args, emit)
        except Exception as e:
            emit({"shape": name, "impl": impl, "error": error_text(e)})
        torch.cuda.empty_cache()  # after an out-of-memory too, once the failed call's tensors are gone
    try:
        check(name, config, block, args, emit)
    except Exception as e:
        emit({"shape": name, "check": "grouped_mm_vs_eager", "error": error_text(e)})


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="mixtral,qwen3,deepseek_v3", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--tokens", default="1,8,64,512,4096", help="comma list of token counts T")
    p.add_argument("--impls", default="grouped_mm,eager", help="comma list of experts implementations")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON lines to this file")
    args = p.parse_args()
    args.shapes = args.shapes.split(",")
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.impls = args.impls.split(",")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; known: {list(SHAPES)}")
    return args


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("hf_moe_bench needs a CUDA GPU")
    with (open(args.out, "w") if args.out else contextlib.nullcontext()) as out_file:
        def emit(record):
            line = json.dumps(record)
            print(line, flush=True)
            if out_file:
                out_file.write(line + "\n")
                out_file.flush()

        emit({"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "F.grouped_mm": hasattr(torch.nn.functional, "grouped_mm"),
              "torch._grouped_mm": hasattr(torch, "_grouped_mm"),
              "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "seed": args.seed})
        with torch.no_grad():
            ceilings(args, emit)
            gc.collect()
            torch.cuda.empty_cache()
            for name in args.shapes:
                run_shape(name, args, emit)  # the block is freed when run_shape returns
                gc.collect()
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
