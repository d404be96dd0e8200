#!/usr/bin/env python3
"""GPU validation of libtessera.so on a machine with an NVIDIA GPU, PyTorch and (optionally) CuPy.

Runs the real CUDA stack (NVIDIA's driver, libcudart, PyTorch's allocator, nvidia-smi) under the
shim with a claim of --limit-gib on GPU 0 and checks what the fake-driver tests can only
simulate:

  1. torch.cuda.mem_get_info() and nvidia-smi report the slice, not the card;
  2. PyTorch allocates 75 % of the slice, and fails past the slice with an out-of-memory error;
  3. CuPy (which reaches the driver through cudart's cuGetProcAddress too) is limited the same;
  4. two processes share one claim; SIGKILL of one gives its memory back to the other;
  5. overhead against no shim: cudaMalloc/cudaFree pairs (caching allocator off) and a matmul loop.

Usage: python3 e2e/gpu/validate.py --shim /path/to/libtessera.so [--limit-gib 2] [--json out.json]
Exit status 0 when every check passed. Results are printed as a Markdown table for
docs/benchmarks.md. Never asks for managed memory, and never more device memory than the limit
plus one allocation, so it is safe on a shared GPU.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

GIB = 1 << 30
MIB = 1 << 20


def gpu0_uuid():
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader", "-i", "0"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    return out


def write_claim(directory, uuid, limit):
    config = {
        "version": 1,
        "claimUid": "gpu-validation",
        "region": os.path.join(directory, "region"),
        "devices": [{"uuid": uuid, "memoryLimit": limit, "cores": 100}],
    }
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def run_python(code, env, timeout=300):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def last_json(proc):
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no result: rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}")


TORCH_WALL = """
import json, torch
free, total = torch.cuda.mem_get_info()
limit = {limit}
x = torch.empty(int(limit * 0.75), dtype=torch.uint8, device="cuda")
ok_75 = True
try:
    y = torch.empty(int(limit * 0.5), dtype=torch.uint8, device="cuda")
    oom = False
except torch.cuda.OutOfMemoryError:
    oom = True
free2, total2 = torch.cuda.mem_get_info()
print(json.dumps({{"total": total, "free": free, "ok_75": ok_75, "oom_past_limit": oom, "free_after": free2}}))
"""

CUPY_WALL = """
import json
try:
    import cupy
except ImportError:
    print(json.dumps({{"skipped": "cupy not installed"}})); raise SystemExit
free, total = cupy.cuda.runtime.memGetInfo()
limit = {limit}
a = cupy.empty(int(limit * 0.75), dtype=cupy.uint8)
try:
    b = cupy.empty(int(limit * 0.5), dtype=cupy.uint8)
    oom = False
except cupy.cuda.memory.OutOfMemoryError:
    oom = True
print(json.dumps({{"total": total, "oom_past_limit": oom}}))
"""

HOLDER = """
import sys, time, torch
x = torch.empty({size}, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("holding", flush=True)
time.sleep(600)
"""

TRY_ALLOC = """
import json, torch
try:
    x = torch.empty({size}, dtype=torch.uint8, device="cuda")
    print(json.dumps({{"ok": True}}))
except torch.cuda.OutOfMemoryError:
    print(json.dumps({{"ok": False}}))
"""

OVERHEAD = """
import json, time, torch
torch.cuda.init()
a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
b = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
for _ in range(20):
    a @ b
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(500):
    a @ b
torch.cuda.synchronize()
matmul_ms = (time.perf_counter() - t0) * 1000 / 500
t0 = time.perf_counter()
for _ in range(2000):
    x = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    del x
torch.cuda.synchronize()
alloc_us = (time.perf_counter() - t0) * 1e6 / 2000
print(json.dumps({{"matmul_ms": matmul_ms, "alloc_free_us": alloc_us}}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shim", required=True)
    parser.add_argument("--limit-gib", type=float, default=2.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    limit = int(args.limit_gib * GIB)
    uuid = gpu0_uuid()
    results, failures = {"uuid": uuid, "limit": limit}, []

    def check(name, condition, detail):
        results.setdefault("checks", []).append({"check": name, "passed": bool(condition), "detail": detail})
        if not condition:
            failures.append(name)

    with tempfile.TemporaryDirectory() as directory:
        config = write_claim(directory, uuid, limit)
        shimmed = dict(os.environ, LD_PRELOAD=os.path.abspath(args.shim), TESSERA_CONFIG=config)
        bare = dict(os.environ)
        bare.pop("LD_PRELOAD", None)

        torch_result = last_json(run_python(TORCH_WALL.format(limit=limit), shimmed))
        check("torch mem_get_info total == limit", torch_result["total"] == limit, torch_result)
        check("torch allocates 75% of the slice", torch_result["ok_75"], torch_result)
        check("torch OOM past the slice", torch_result["oom_past_limit"], torch_result)

        smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             env=shimmed, capture_output=True, text=True)
        total_mib = int(smi.stdout.split(",")[0]) if smi.returncode == 0 else -1
        check("nvidia-smi memory.total == limit", total_mib == limit // MIB, smi.stdout.strip() or smi.stderr.strip())

        cupy_result = last_json(run_python(CUPY_WALL.format(limit=limit), shimmed))
        if "skipped" not in cupy_result:
            check("cupy memGetInfo total == limit", cupy_result["total"] == limit, cupy_result)
            check("cupy OOM past the slice", cupy_result["oom_past_limit"], cupy_result)

        size = int(limit * 0.6)
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER.format(size=size))],
                                  env=shimmed, stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
        second = last_json(run_python(TRY_ALLOC.format(size=size), shimmed))
        check("second process refused while the first holds 60%", not second["ok"], second)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        time.sleep(1)
        third = last_json(run_python(TRY_ALLOC.format(size=size), shimmed))
        check("after SIGKILL of the first, the memory is back", third["ok"], third)

        env_no_cache = lambda env: dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        base = last_json(run_python(OVERHEAD, env_no_cache(bare)))
        with_shim = last_json(run_python(OVERHEAD, env_no_cache(shimmed)))
        results["overhead"] = {"bare": base, "shim": with_shim}

    print("| check | result | detail |\n|---|---|---|")
    for c in results["checks"]:
        print(f"| {c['check']} | {'pass' if c['passed'] else 'FAIL'} | `{json.dumps(c['detail'])[:120]}` |")
    o = results["overhead"]
    print(f"\n| measure | no shim | shim |\n|---|---|---|")
    print(f"| fp16 4096² matmul (ms) | {o['bare']['matmul_ms']:.3f} | {o['shim']['matmul_ms']:.3f} |")
    print(f"| 1 MiB alloc+free, caching off (µs) | {o['bare']['alloc_free_us']:.1f} | {o['shim']['alloc_free_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
