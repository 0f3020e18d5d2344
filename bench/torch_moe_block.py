"""The PyTorch side of the CPU MoeLayer benchmark (bench/run_cpu_layer_bench.sh).

Times a Mixtral sparse MoE block written the way Hugging Face transformers (5.x) writes its
eager code -- MixtralTopKRouter, MixtralExperts (3-D gate_up_proj / down_proj parameters, a
Python loop over the experts that were hit) and MixtralSparseMoeBlock -- in float32 on the CPU,
on the same checkpoint and the same inputs as bench/moe_layer_bench.cc, and checks that it
computes what the C++ layer computed (relative norm error < 1e-5, identical expert choices).

Prints one JSON line per T: {"T":..,"torch_ms_median":..,"torch_ms_min":..,"rel_err":..}.
Run with Debian's interpreter (/usr/bin/python3: torch 1.13 CPU on the system OpenBLAS).
Thread count: --threads N (default OPENBLAS_NUM_THREADS, else nproc) for both torch's intra-op
pool (torch.set_num_threads) and OpenBLAS, which must be set before OpenBLAS loads, hence the
late imports. That is the configuration timed as torch_ms_*.

Debian's torch runs its element-wise ops on an OpenMP pool while its GEMMs run on OpenBLAS's
own pthreads; with N threads in each, the two pools spin against each other on N cores and
the small ops between GEMMs slow down by orders of magnitude. So that the comparison is not
won on that, the block is also timed with one intra-op thread (OpenBLAS still N threads):
torch_intra1_ms_*. Compare against the faster of the two.
"""

import argparse
import json
import os
import statistics
import sys
import time

REL_TOL = 1e-5


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--input-dir", required=True, help="hidden_states_T<T>.safetensors from moe_layer_bench")
    p.add_argument("--output-dir", default="", help="output_T<T>.safetensors from moe_layer_bench, to check against")
    p.add_argument("--tokens", default="1,32,256,1024")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="0: OPENBLAS_NUM_THREADS, else nproc")
    return p.parse_args()


def main():
    args = parse_args()
    env_threads = os.environ.get("OPENBLAS_NUM_THREADS")
    threads = args.threads or int(env_threads or os.cpu_count())
    if env_threads is not None and int(env_threads) != threads:
        sys.exit(f"--threads {threads} differs from OPENBLAS_NUM_THREADS={env_threads}")
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from safetensors_io import load_file, to_float32

    torch.set_num_threads(threads)

    # ---- The block, structured like transformers' modeling_mixtral.py (5.x) ----------------

    class MixtralTopKRouter(nn.Module):
        def __init__(self, num_experts, top_k, hidden_dim):
            super().__init__()
            self.top_k = top_k
            self.num_experts = num_experts
            self.hidden_dim = hidden_dim
            self.weight = nn.Parameter(torch.empty(num_experts, hidden_dim))

        def forward(self, hidden_states):
            hidden_states = hidden_states.reshape(-1, self.hidden_dim)
            router_logits = F.linear(hidden_states, self.weight)  # (seq_len, num_experts)
            router_probs = F.softmax(router_logits.float(), dim=-1)
            router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
            router_scores = router_top_value
            return router_logits, router_scores, router_indices

    class MixtralExperts(nn.Module):
        def __init__(self, num_experts, hidden_dim, intermediate_dim):
            super().__init__()
            self.num_experts = num_experts
            self.hidden_dim = hidden_dim
            self.intermediate_dim = intermediate_dim
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_dim, hidden_dim))
            self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, intermediate_dim))
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            final_hidden_states = torch.zeros_like(hidden_states)
            with torch.no_grad():
                expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts)
                expert_mask = expert_mask.permute(2, 1, 0)
                expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

            for expert_idx in expert_hit:
                expert_idx = expert_idx[0]
                if expert_idx == self.num_experts:
                    continue
                top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
                current_state = hidden_states[token_idx]
                gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
                current_hidden_states = self.act_fn(gate) * up
                current_hidden_states = F.linear(current_hidden_states, self.down_proj[expert_idx])
                current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
                final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
            return final_hidden_states

    class MixtralSparseMoeBlock(nn.Module):
        def __init__(self, num_experts, top_k, hidden_dim, intermediate_dim):
            super().__init__()
            self.top_k = top_k
            self.gate = MixtralTopKRouter(num_experts, top_k, hidden_dim)
            self.experts = MixtralExperts(num_experts, hidden_dim, intermediate_dim)

        def forward(self, hidden_states):
            batch_size, sequence_length, hidden_dim = hidden_states.shape
            hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
            _, top_k_weights, top_k_index = self.gate(hidden_states)
            hidden_states = self.experts(hidden_states, top_k_index, top_k_weights)
            hidden_states = hidden_states.reshape(batch_size, sequence_length, hidden_dim)
            return hidden_states, top_k_index, top_k_weights

    # ---- Load the checkpoint the way HF 5.x converts Mixtral's per-expert w1/w3/w2 -------

    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "mixtral":
        sys.exit(f"{args.model}: model_type {cfg.get('model_type')!r}, this script runs mixtral")
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    E, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    tensors, dtypes, _ = load_file(os.path.join(args.model, "model.safetensors"))
    p = f"model.layers.{args.layer}.block_sparse_moe"

    def get(name):
        return torch.from_numpy(to_float32(tensors.pop(name), dtypes[name]))

    block = MixtralSparseMoeBlock(E, k, H, I).eval()
    with torch.no_grad():
        block.gate.weight.copy_(get(f"{p}.gate.weight"))
        for e in range(E):
            ep = f"{p}.experts.{e}"
            block.experts.gate_up_proj[e, :I].copy_(get(f"{ep}.w1.weight"))
            block.experts.gate_up_proj[e, I:].copy_(get(f"{ep}.w3.weight"))
            block.experts.down_proj[e].copy_(get(f"{ep}.w2.weight"))
    del tensors

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}", file=sys.stderr)

    failed = False
    for T in [int(t) for t in args.tokens.split(",")]:
        xs, _, _ = load_file(os.path.join(args.input_dir, f"hidden_states_T{T}.safetensors"))
        x = torch.from_numpy(np.ascontiguousarray(xs["hidden_states"], dtype=np.float32))
        x = x.reshape(1, T, H)
        line = {"T": T}
        for intra_op, key in ((threads, "torch"), (1, "torch_intra1")):
            if key == "torch_intra1" and threads == 1:
                continue
            torch.set_num_threads(intra_op)
            times = []
            with torch.inference_mode():
                for r in range(-args.warmup, args.repeats):
                    t0 = time.perf_counter()
                    y, ids, w = block(x)
                    dt = (time.perf_counter() - t0) * 1e3
                    if r >= 0:
                        times.append(dt)
            line[f"{key}_ms_median"] = round(statistics.median(times), 4)
            line[f"{key}_ms_min"] = round(min(times), 4)
        torch.set_num_threads(threads)
        line["repeats"] = args.repeats
        if args.output_dir:
            ref, _, _ = load_file(os.path.join(args.output_dir, f"output_T{T}.safetensors"))
            y_ref = torch.from_numpy(ref["output"].astype(np.float32))
            y = y.reshape(T, H)
            rel = float(torch.linalg.norm(y - y_ref) / torch.linalg.norm(y_ref))
            ids_match = bool(np.array_equal(ids.numpy().astype(np.int32), ref["topk_ids"]))
            line["rel_err"] = float(f"{rel:.3g}")
            line["topk_ids_match"] = ids_match
            if not (rel < REL_TOL and ids_match):
                failed = True
                print(f"T={T}: PyTorch and MoeLayer disagree: rel_err {rel:.3g} "
                      f"(tolerance {REL_TOL}), topk_ids match: {ids_match}", file=sys.stderr)
        print(json.dumps(line), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
