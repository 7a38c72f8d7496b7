"""Benchmark: reading a checkpoint straight from S3 against downloading it first.

Starts moto's S3 server on 127.0.0.1 (the test dependency), uploads a checkpoint of at least
1 GiB of float32 data, and measures, as processes,

  (a) paramscope norms --per-param s3://...              (streams from the store)
  (b) boto3 download to a temporary folder + paramscope norms --per-param on the copy
  (c) paramscope count s3://... on a 3,000-array checkpoint: requests and wall time

and prints the ratio (a)/(b) (target <= 0.7) and the request count of (c) (bound: 30). boto3
is used here only, as the baseline; paramscope itself reads through TensorStore.

Usage: python scripts/bench_remote.py [--gib 1.0] [--repeats 1]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _bench import PYTHON, machine, measure, report  # noqa: E402
from remote_stores import BUCKET, environ, moto_s3  # noqa: E402

WRITE = """
import sys, numpy as np, orbax.checkpoint as ocp
path, gib, arrays = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
if arrays:  # many small arrays, for the metadata request count
    tree = {f"layer_{i:04d}": {f"w{j}": np.full((16, 8), i + j, np.float32) for j in range(10)}
            for i in range(arrays // 10)}
else:  # 16 large arrays of random data (compresses little: the bytes on disk stay ~ the data)
    n = int(gib * 2**30 / 4 / 16)
    tree = {f"block_{i:02d}": {"kernel": rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024)}
            for i in range(16)}
ckpt = ocp.StandardCheckpointer()
ckpt.save(path, tree)
ckpt.wait_until_finished()
"""

DOWNLOAD = """
import os, sys, boto3
endpoint, bucket, prefix, target = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        for o in page.get("Contents", [])]
for key in keys:
    path = os.path.join(target, os.path.relpath(key, prefix))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s3.download_file(bucket, key, path)
"""


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, moto_s3(tmp) as s3, environ(s3.env):
        big, small = os.path.join(tmp, "big"), os.path.join(tmp, "small")
        print(f"writing a {args.gib} GiB checkpoint and a 3,000-array one", file=sys.stderr)
        subprocess.run([PYTHON, "-c", WRITE, big, str(args.gib), "0"], check=True, capture_output=True)
        subprocess.run([PYTHON, "-c", WRITE, small, "0", "3000"], check=True, capture_output=True)
        size = folder_bytes(big)
        big_url, small_url = s3.upload(big, "big"), s3.upload(small, "small")
        shutil.rmtree(big)  # the baseline must download it again

        paramscope = [PYTHON, "-m", "paramscope"]
        streamed, downloaded = [], []
        for _ in range(args.repeats):
            streamed.append(measure(paramscope + ["norms", "--per-param", "-q", big_url]))
            copy = os.path.join(tmp, "copy")
            start = time.perf_counter()
            measure([PYTHON, "-c", DOWNLOAD, s3.endpoint, BUCKET, "big", copy])
            _, rss = measure(paramscope + ["norms", "--per-param", "-q", copy])
            downloaded.append((time.perf_counter() - start, rss))
            shutil.rmtree(copy)
        before = len(s3.requests())
        count_wall, count_rss = measure(paramscope + ["count", small_url])
        count_requests = len(s3.requests()) - before

        a = sorted(w for w, _ in streamed)[len(streamed) // 2]
        b = sorted(w for w, _ in downloaded)[len(downloaded) // 2]
        print(f"machine: {machine()}")
        print(f"checkpoint: {size / 2**30:.2f} GiB on disk, 16 arrays; moto S3 server on 127.0.0.1")
        ok = report(
            [
                ("(a) norms --per-param s3://", a, max(r for _, r in streamed)),
                ("(b) boto3 download + norms --per-param", b, max(r for _, r in downloaded)),
                (f"(c) count s3:// (3,000 arrays): {count_requests} requests", count_wall, count_rss),
            ],
            [("(a) / (b)", a / b, 0.7), ("(c) requests / 30", count_requests / 30, 1.0)],
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
