#!/usr/bin/env python3
"""Call the MoE Mesh router's KServe v2 ModelInfer from Python (Debian's python3-grpcio).

    /usr/bin/python3 python/kserve_client.py --router 127.0.0.1:PORT [--tokens 4] [--layer L]

Start a mesh first, e.g. `build/tools/moemesh demo --serve --port 8001`. The message
classes are generated at run time from proto/grpc_predict_v2.proto with Debian's protoc
(nothing is downloaded); the call itself goes through a plain grpc channel.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import grpc
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_messages():
    out = tempfile.mkdtemp(prefix="moemesh_pb_")
    subprocess.run(["protoc", f"--proto_path={ROOT}/proto", f"--python_out={out}",
                    "grpc_predict_v2.proto"], check=True)
    sys.path.insert(0, out)
    import grpc_predict_v2_pb2  # noqa: E402
    return grpc_predict_v2_pb2


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", required=True, help="host:port of the router")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--layer", type=int, default=-1, help="MoE layer (default: the first)")
    ap.add_argument("--model", default="moe")
    args = ap.parse_args()
    pb = load_messages()
    channel = grpc.insecure_channel(args.router)
    call = lambda method, req, resp_type: channel.unary_unary(  # noqa: E731
        f"/inference.GRPCInferenceService/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=resp_type.FromString)(req, timeout=30)

    meta = call("ModelMetadata", pb.ModelMetadataRequest(name=args.model), pb.ModelMetadataResponse)
    hidden = next(t for t in meta.inputs if t.name == "hidden_states").shape[1]
    print(f"model {meta.name} ({meta.platform}), hidden size {hidden}")

    x = np.random.default_rng(0).standard_normal((args.tokens, hidden), dtype=np.float32)
    req = pb.ModelInferRequest(model_name=args.model)
    inp = req.inputs.add(name="hidden_states", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    if args.layer >= 0:
        req.inputs.add(name="layer", datatype="INT64", shape=[1])
        req.raw_input_contents.append(np.array([args.layer], dtype=np.int64).tobytes())
    for name in ("output", "topk_ids", "topk_weights"):
        req.outputs.add(name=name)
    del inp
    resp = call("ModelInfer", req, pb.ModelInferResponse)
    dtypes = {"FP32": np.float32, "INT32": np.int32}
    for out, raw in zip(resp.outputs, resp.raw_output_contents):
        arr = np.frombuffer(raw, dtype=dtypes[out.datatype]).reshape(list(out.shape))
        print(f"{out.name} {out.datatype}{list(out.shape)}: first row {arr[0][:6]}")


if __name__ == "__main__":
    main()
