"""Peer side of `cargo xtask compare quantize`: times ONNX Runtime's QuantizeLinear /
DequantizeLinear and numpy on the same .npy data and parameters as quantbench, one thread,
median of timed calls after warm-up, and prints one JSON line per peer.

Parameters mirror quantbench's `bench-kernel`: int8 codes, scale S and zero point Z per tensor;
per channel, x viewed as [C, n/C] with channel c scaled by S * (1 + c / C) (float32 arithmetic).
With --codes-out, ONNX Runtime's int8 output is written raw so quantbench can compare codes.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402


def median_seconds(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def channel_scales(scale, channels):
    s = np.float32(scale)
    c = np.arange(channels, dtype=np.float32)
    return (s * (np.float32(1) + c / np.float32(channels))).astype(np.float32)


def ort_session(op, shape, scale, zp, per_channel):
    if per_channel:
        scale_t = helper.make_tensor("s", TensorProto.FLOAT, [len(scale)], scale.tolist())
        zp_t = helper.make_tensor("z", TensorProto.INT8, [len(scale)], [zp] * len(scale))
        attrs = {"axis": 0}
    else:
        scale_t = helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)])
        zp_t = helper.make_tensor("z", TensorProto.INT8, [], [zp])
        attrs = {}
    if op == "QuantizeLinear":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
        y = helper.make_tensor_value_info("y", TensorProto.INT8, list(shape))
    else:
        x = helper.make_tensor_value_info("x", TensorProto.INT8, list(shape))
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    node = helper.make_node(op, ["x", "s", "z"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [x], [y], initializer=[scale_t, zp_t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--npy", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--scale", type=float, required=True)
    ap.add_argument("--zero-point", type=int, required=True)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--codes-out")
    a = ap.parse_args()

    x = np.load(a.npy)
    n = x.size
    per_channel = a.kernel.endswith("per_channel")
    zp = a.zero_point
    if per_channel:
        x = x.reshape(a.channels, n // a.channels)
        scale = channel_scales(a.scale, a.channels)
        np_scale = scale.reshape(a.channels, 1)
    else:
        scale = np.float32(a.scale)
        np_scale = scale
    quantize = a.kernel.startswith("quantize")

    # codes every dequantize variant reads: ONNX Runtime's own quantization of x
    qsess = ort_session("QuantizeLinear", x.shape, scale, zp, per_channel)
    codes = qsess.run(None, {"x": x})[0]
    if a.codes_out:
        codes.tofile(a.codes_out)

    op = "QuantizeLinear" if quantize else "DequantizeLinear"
    sess = ort_session(op, x.shape, scale, zp, per_channel)
    inp = x if quantize else codes
    x_ort = ort.OrtValue.ortvalue_from_numpy(inp)
    y_ort = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), np.int8 if quantize else np.float32)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", x_ort)
    binding.bind_ortvalue_output("y", y_ort)
    t_ort = median_seconds(lambda: sess.run_with_iobinding(binding), a.reps)

    tmp = np.empty(x.shape, np.float32)
    q = np.empty(x.shape, np.int8)
    if quantize:
        def np_fn():
            np.divide(x, np_scale, out=tmp)
            np.rint(tmp, out=tmp)
            np.add(tmp, np.float32(zp), out=tmp)
            np.clip(tmp, -128, 127, out=tmp)
            np.copyto(q, tmp, casting="unsafe")
    else:
        def np_fn():
            np.copyto(tmp, codes, casting="unsafe")
            np.subtract(tmp, np.float32(zp), out=tmp)
            np.multiply(tmp, np_scale, out=tmp)
    t_np = median_seconds(np_fn, a.reps)
    if quantize and not np.array_equal(q, codes):
        raise SystemExit("numpy and ONNX Runtime disagree on the codes")

    for peer, t in (("onnxruntime " + ort.__version__, t_ort), ("numpy " + np.__version__, t_np)):
        print(json.dumps({"kernel": a.kernel, "n": n, "threads": 1, "peer": peer,
                          "seconds": t, "gbps": 4.0 * n / t / 1e9}))


if __name__ == "__main__":
    main()
