"""Large blobs through the store: seal + write, whole read, chunked read; time and peak RSS each.

    .venv/bin/python bench/blobs.py --mib 1024 [--s3]

Each step runs in its own process so its peak RSS (ru_maxrss) is its own. --s3 starts moto's S3
server on 127.0.0.1 and keeps the blobs there. What this measures is the blob layer alone
(engine/store/db.py, engine/security/stream.py, engine/store/blobfiles.py), not the DICOM path:
the payload is made in memory first (that is what intake hands the store today), so the write
step's peak includes the payload and its ciphertext; the chunked read's peak is what streaming
retrieval costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _store(tmp: Path, s3: str | None):
    from engine.security.crypto import KeyRing
    from engine.store.blobfiles import ObjectStore, S3Settings
    from engine.store.db import Store

    files = (ObjectStore("s3://bench/blobs", S3Settings(s3, "us-east-1", "k", "s", allow_http=True))
             if s3 else tmp / "blobs")
    store = Store(f"sqlite:///{tmp}/db.sqlite", files, KeyRing(tmp / "keys.json"))
    store.migrate()
    return store


def _step(step: str, tmp: Path, mib: int, s3: str | None) -> dict:
    store = _store(tmp, s3)
    t = time.perf_counter()
    if step == "write":
        data = os.urandom(1 << 20) * mib
        with store.engine.begin() as c:
            blob_id = store.put_blob(c, data, "bench-message")
        (tmp / "id").write_text(blob_id)
        n = len(data)
    else:
        blob_id = (tmp / "id").read_text()
        with store.engine.connect() as c:
            if step == "read":
                n = len(store.get_blob(c, blob_id))
            else:
                n = sum(len(x) for x in store.blob_chunks(c, blob_id))
    secs = time.perf_counter() - t
    return {"step": step, "bytes": n, "seconds": round(secs, 2),
            "MiB/s": round(n / secs / (1 << 20), 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--s3", action="store_true")
    ap.add_argument("--step")
    ap.add_argument("--tmp")
    ap.add_argument("--endpoint")
    a = ap.parse_args()
    if a.step:
        print(json.dumps(_step(a.step, Path(a.tmp), a.mib, a.endpoint)))
        return
    server = None
    endpoint = None
    if a.s3:
        import socket

        import boto3
        from moto.server import ThreadedMotoServer
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                     aws_secret_access_key="s").create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for step in ("write", "read", "chunks"):
                args = [sys.executable, __file__, "--step", step, "--tmp", tmp, "--mib", str(a.mib)]
                if endpoint:
                    args += ["--endpoint", endpoint]
                out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
                print(out.stdout.strip())
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
