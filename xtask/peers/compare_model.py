"""Peer side of `cargo xtask compare model`: ONNX Runtime on the same ONNX model and the same
CIFAR-10 files as quantbench. Measures (1) fp32 top-1 on the test file and single-thread latency
at the given batch sizes, (2) quantize_static (QDQ, per-channel weights, MinMax calibration on
the first N training images, int8 weights and activations) top-1 and latency. Prints one JSON
object."""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def load_cifar(path, limit=None):
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    if limit:
        raw = raw[:limit]
    labels = raw[:, 0].astype(np.int64)
    x = raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32)
    # the same arithmetic as quantbench: (p * (1/255) - mean) * (1/std)
    x = (x * np.float32(1.0 / 255.0) - MEAN) * (np.float32(1.0) / STD)
    return x.astype(np.float32), labels


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def accuracy(sess, x, y, batch=256):
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        out = sess.run(None, {name: x[i:i + batch]})[0]
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def latency(sess, x, batch, reps):
    name = sess.get_inputs()[0].name
    xb = np.ascontiguousarray(np.resize(x, (batch,) + x.shape[1:]))
    sess.run(None, {name: xb})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {name: xb})
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


class Reader(CalibrationDataReader):
    def __init__(self, x, name):
        self.it = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    x, y = load_cifar(a.test, a.limit)
    xc, _ = load_cifar(a.train, a.calib)
    out = {"peer": "onnxruntime " + ort.__version__, "images": len(x), "calib_images": len(xc)}
    fp32 = session(a.model, 2)
    out["fp32_top1"] = accuracy(fp32, x, y)
    one = session(a.model, 1)
    out["fp32_latency_ms"] = {str(b): latency(one, x, b, a.reps) for b in batches}
    with tempfile.TemporaryDirectory() as d:
        pre = os.path.join(d, "pre.onnx")
        q = os.path.join(d, "qdq.onnx")
        quant_pre_process(a.model, pre)
        name = one.get_inputs()[0].name
        quantize_static(pre, q, Reader(xc, name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        qs = session(q, 2)
        out["qdq_top1"] = accuracy(qs, x, y)
        q1 = session(q, 1)
        out["qdq_latency_ms"] = {str(b): latency(q1, x, b, a.reps) for b in batches}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
