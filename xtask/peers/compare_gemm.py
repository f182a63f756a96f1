"""Peer side of `cargo xtask compare gemm`: ONNX Runtime's MatMulInteger on a one-node graph
(A [M x K] u8 or i8 input, B [K x N] i8 initializer, zero points as initializers), and
PyTorch's quantized linear when torch is installed. Prints one JSON line per shape and
kernel: {kernel, m, k, n, threads, peer, peer_gops, peer_s}. GOPS = 2 M N K / seconds
(median of timed calls, Python call overhead included, as a user of the peer sees it)."""
import argparse
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def median_seconds(f, target_s=0.4, min_reps=5):
    f()
    f()
    t = time.perf_counter()
    f()
    one = max(time.perf_counter() - t, 1e-7)
    reps = max(min_reps, min(2000, int(target_s / one)))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def ort_matmulinteger(m, k, n, signed_a, a_zp, threads, rng):
    a_type = TensorProto.INT8 if signed_a else TensorProto.UINT8
    a_np = np.int8 if signed_a else np.uint8
    b = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    inits = [
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array(a_zp, dtype=a_np), "a_zp"),
        numpy_helper.from_array(np.array(0, dtype=np.int8), "b_zp"),
    ]
    node = helper.make_node("MatMulInteger", ["A", "B", "a_zp", "b_zp"], ["Y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", a_type, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    lo, hi = (-128, 128) if signed_a else (0, 256)
    a = rng.integers(lo, hi, size=(m, k)).astype(a_np)
    return median_seconds(lambda: sess.run(None, {"A": a}))


def torch_linear(m, k, n, a_zp, threads):
    try:
        import torch
    except ImportError:
        return None, None
    torch.set_num_threads(threads)
    torch.backends.quantized.engine = "onednn" if "onednn" in torch.backends.quantized.supported_engines else "x86"
    x = torch.quantize_per_tensor(torch.rand(m, k), 0.01, a_zp, torch.quint8)
    lin = torch.ao.nn.quantized.Linear(k, n)
    w = torch.quantize_per_tensor(torch.randn(n, k) * 0.1, 0.01, 0, torch.qint8)
    lin.set_weight_bias(w, None)
    return median_seconds(lambda: lin(x)), "pytorch " + torch.__version__ + " quantized.Linear (" + torch.backends.quantized.engine + ")"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", required=True, help="MxKxN,MxKxN,...")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--kernels", default="gemm_u8i8_i32,gemm_i8i8_i32")
    ap.add_argument("--a-zero-point", type=int, default=0)
    ap.add_argument("--seed", type=int, default=20261127)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    for shape in a.shapes.split(","):
        m, k, n = (int(v) for v in shape.split("x"))
        for threads in (int(t) for t in a.threads.split(",")):
            for kernel in a.kernels.split(","):
                signed = kernel == "gemm_i8i8_i32"
                zp = a.a_zero_point if not signed else a.a_zero_point - 128
                s = ort_matmulinteger(m, k, n, signed, zp, threads, rng)
                print(json.dumps({
                    "kernel": kernel, "m": m, "k": k, "n": n, "threads": threads,
                    "peer": "onnxruntime " + ort.__version__ + " MatMulInteger",
                    "peer_s": s, "peer_gops": 2.0 * m * k * n / s / 1e9,
                }), flush=True)
            if "gemm_u8i8_i32" in a.kernels:
                s, name = torch_linear(m, k, n, a.a_zero_point, threads)
                if s is not None:
                    print(json.dumps({
                        "kernel": "gemm_u8i8_i32", "m": m, "k": k, "n": n, "threads": threads,
                        "peer": name, "peer_s": s, "peer_gops": 2.0 * m * k * n / s / 1e9,
                    }), flush=True)


if __name__ == "__main__":
    main()
