"""Peer side of `cargo xtask compare kmeans`: scikit-learn KMeans (lloyd, k-means++ init,
n_init=1, seeded) on the same 1-D .npy data as quantbench; prints one JSON line with the fit
time and the SSE of its centroids (every value to its nearest centroid, summed in float64)."""
import argparse
import json
import os
import time

import numpy as np
from sklearn.cluster import KMeans


def sse_of(x, centers):
    c = np.sort(centers.astype(np.float64))
    mids = (c[1:] + c[:-1]) / 2
    idx = np.searchsorted(mids, x, side="left")
    return float(np.sum((x - c[idx]) ** 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--npy", required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    x = np.load(a.npy).astype(np.float32)
    km = KMeans(n_clusters=a.k, init="k-means++", n_init=1, algorithm="lloyd", random_state=a.seed)
    t = time.perf_counter()
    km.fit(x.reshape(-1, 1))
    dt = time.perf_counter() - t
    import sklearn
    print(json.dumps({
        "peer": "scikit-learn " + sklearn.__version__,
        "peer_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "peer_s": dt,
        "peer_sse": sse_of(x.astype(np.float64), km.cluster_centers_.ravel()),
    }))


if __name__ == "__main__":
    main()
