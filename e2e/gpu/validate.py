#!/usr/bin/env python3
"""GPU validation of libtessera.so on a machine with an NVIDIA GPU, PyTorch and (optionally) CuPy.

Runs the real CUDA stack (NVIDIA's driver, libcudart, PyTorch's allocator, nvidia-smi) under the
shim with a claim of --limit-gib on GPU 0 and checks what the fake-driver tests can only
simulate:

  1. torch.cuda.mem_get_info() and nvidia-smi report the slice, not the card;
  2. PyTorch allocates 75 % of the slice, and fails past the slice with an out-of-memory error;
  3. CuPy (which reaches the driver through cudart's cuGetProcAddress too) is limited the same;
  4. two processes share one claim; SIGKILL of one gives its memory back to the other;
  5. overhead against no shim: cudaMalloc/cudaFree pairs (caching allocator off) and a matmul loop;
  6. compute shares (unless --no-compute), with fp16 matmul loops: one claim at 10, 25, 50, 75 and 90
     cores reaches that share of the GPU's solo throughput within ±3 points after 1 s; claims at 25
     and 40 side by side run 25:40 within 10 %; a high-priority claim keeps ≥ 95 % of its solo
     throughput beside two saturating low-priority ones, and they get the GPU back when it stops;
     a CUDA-graph replay loop is limited too.

  7. memory oversubscription (unless --no-spill), bounded: a claim that opted in is told the card
     has only half its limit (physicalMemory) and a claim that did not opt in reserves a quarter;
     PyTorch (caching off) allocates the opted-in claim's limit in 64 MiB tensors: the first
     quarter lands on the card, the rest is served as managed memory; the region's spilled bytes
     match, kernels read and write spilled tensors correctly, and a spill limit refuses with an
     out-of-memory error and the shim's stderr line.

  8. inference beside training (unless --no-inference): a small fp16 model's forward pass at a
     fixed rate (one request every 4 ms, each synchronised) beside a saturating matmul loop, alone,
     with no shim, as a `high` claim beside a `low` one, and as two `normal` claims at 50/50; the
     inference's p50/p99/p99.9 latency and the trainer's share of its solo throughput. Checks the
     goals of the simulation's design (docs/compute.md#gap-filling-what-a-higher-claim-leaves): with priority, the
     inference's p99 within 10 % of alone and the trainer at ≥ 0.8 × what the inference leaves.

  9. every byte counted (with --probe): tessera-gpu-probe's figure for a context on GPU 0 beside
     what nvidia-smi reports for a bare PyTorch process that has allocated nothing (the probe's
     is the bare driver context; PyTorch's adds its module images); then a claim charged the
     probe's figure per context, filled by PyTorch (caching off): the card's own per-process figure
     for it (nvidia-smi on the host, no shim) must stay within the wall plus what module images
     add (reported). With --hook as well, run as root, where the probe found the driver's wall
     (NVML 13.4): a process without the shim in a cgroup whose limit tessera-cdi-hook set stops at
     the limit with the driver's out-of-memory.

Usage: python3 e2e/gpu/validate.py --shim /path/to/libtessera.so [--limit-gib 2] [--json out.json]
       [--no-compute] [--no-spill] [--no-inference] [--span 6]
       [--probe tessera-gpu-probe] [--hook tessera-cdi-hook]
Exit status 0 when every check passed. Results are printed as a Markdown table for
docs/benchmarks.md. Never more device memory than the limit plus one allocation, and the spill
check asks for at most three quarters of a claim it sizes to a quarter of the card's free memory
(so never more managed memory than the card has free): safe on a shared GPU.
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


def write_claim(directory, uuid, limit, name="gpu-validation", cores=100, priority="normal", policy="default",
                context_overhead=0):
    config = {
        "version": 1,
        "claimUid": name,
        "region": os.path.join(directory, f"{name}.region"),
        "devices": [{"uuid": uuid, "memoryLimit": limit, "cores": cores, "contextOverhead": context_overhead}],
        "priority": priority,
        "corePolicy": policy,
    }
    path = os.path.join(directory, f"{name}.json")
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


# A compute workload: fp16 matmuls (or replays of a CUDA graph of them) for `span` seconds,
# reporting matmuls per second in each `window` (synchronising at each window's end).
MATMUL_LOOP = """
import json, sys, time, torch
span, window, graph = {span}, {window}, {graph}
a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
b = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
for _ in range(10):
    a @ b
torch.cuda.synchronize()
if graph:
    stream = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(g):
            for _ in range(4):
                c = a @ b
    torch.cuda.synchronize()
    step, per_step = g.replay, 4
else:
    step, per_step = (lambda: a @ b), 1
print("ready", flush=True)
sys.stdin.readline()
rates, start = [], time.perf_counter()
mark, count = start, 0
while True:
    step()
    count += per_step
    if count % 8 == 0:
        torch.cuda.synchronize()
        now = time.perf_counter()
        if now - mark >= window:
            rates.append(count / (now - mark))
            mark, count = now, 0
            if now - start >= span:
                break
print(json.dumps({{"rates": rates}}))
"""


def run_loops(envs, span, window=0.25, graph=False, spans=None):
    """Starts one matmul loop per environment, releases them together, returns their rates."""
    procs = []
    for i, env in enumerate(envs):
        code = textwrap.dedent(MATMUL_LOOP.format(span=(spans or [span] * len(envs))[i], window=window, graph=graph))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"loop did not start: {line!r} {p.stderr.read()}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=span * 4 + 120)
        lines = [l for l in stdout.splitlines() if l.startswith("{")]
        if not lines:
            raise RuntimeError(f"loop failed: {stderr}")
        out.append(json.loads(lines[-1])["rates"])
    return out


def steady(rates, window=0.25, settle=1.0):
    """Windows after the settling time, less the last one."""
    skip = int(settle / window)
    return rates[skip:-1] if len(rates) > skip + 1 else rates


def mean(values):
    return sum(values) / len(values) if values else float("nan")


def compute_checks(check, results, directory, uuid, limit, shim, span):
    board = os.path.join(directory, "board")
    os.makedirs(board, exist_ok=True)

    def env_for(name, cores, priority="normal", policy="force"):
        config = write_claim(directory, uuid, limit, name=name, cores=cores, priority=priority, policy=policy)
        return dict(os.environ, LD_PRELOAD=shim, TESSERA_CONFIG=config, TESSERA_BOARD=board)

    bare = dict(os.environ)
    bare.pop("LD_PRELOAD", None)
    solo = mean(steady(run_loops([bare], span)[0]))
    results["compute"] = {"solo_matmuls_per_s": solo, "shares": {}}
    for cores in (10, 25, 50, 75, 90):
        rates = run_loops([env_for(f"share-{cores}", cores)], span)[0]
        windows = [100 * r / solo for r in steady(rates)]
        results["compute"]["shares"][cores] = {"mean": mean(windows), "windows": windows}
        check(f"cores {cores}: every window after 1 s within ±3 points",
              all(abs(w - cores) <= 3 for w in windows), {"mean": round(mean(windows), 1), "min": round(min(windows), 1), "max": round(max(windows), 1)})

    graph_solo = mean(steady(run_loops([bare], span, graph=True)[0]))
    graph = [100 * r / graph_solo for r in steady(run_loops([env_for("graph-30", 30)], span, graph=True)[0])]
    results["compute"]["graph_30"] = mean(graph)
    check("CUDA graph replays at cores 30 within ±3 points", abs(mean(graph) - 30) <= 3, {"mean": round(mean(graph), 1)})

    pair = run_loops([env_for("pair-25", 25, policy="default"), env_for("pair-40", 40, policy="default")], span)
    a, b = mean(steady(pair[0])), mean(steady(pair[1]))
    results["compute"]["pair_25_40"] = {"a": 100 * a / solo, "b": 100 * b / solo, "ratio": a / b}
    check("claims at 25 and 40 run 25:40 within 10 %", abs((a / b) / 0.625 - 1) <= 0.10, {"ratio": round(a / b, 3)})

    high = env_for("high", 100, priority="high", policy="default")
    high_solo = mean(steady(run_loops([high], span)[0]))
    lows = [env_for(f"low-{i}", 100, priority="low", policy="default") for i in (1, 2)]
    trio = run_loops([high] + lows, span, spans=[span, 2 * span, 2 * span])
    beside = mean(steady(trio[0]))
    results["compute"]["priority"] = {"high_solo": high_solo, "high_beside_lows": beside}
    check("high priority keeps ≥ 95 % of its solo throughput beside two low", beside >= 0.95 * high_solo,
          {"kept_percent": round(100 * beside / high_solo, 1)})
    after = [mean(r[int((span + 1.0) / 0.25):-1]) for r in trio[1:]]
    check("low-priority claims get the GPU back when the high one stops", sum(after) >= 0.9 * solo,
          {"low_after_percent": [round(100 * x / solo, 1) for x in after]})


# A request-serving loop: a small model's forward pass (8 fp16 Linear layers of 1024, batch 8) at
# each arrival, synchronised; a request that arrives while the previous one is served is dropped.
INFERENCE_LOOP = """
import json, sys, time, torch
period, span = {period}, {span}
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda().half()
x = torch.randn(8, 1024, device="cuda", dtype=torch.float16)
with torch.no_grad():
    for _ in range(50):
        model(x)
torch.cuda.synchronize()
busy = 0.0
with torch.no_grad():
    t0 = time.perf_counter()
    for _ in range(200):
        model(x)
        torch.cuda.synchronize()
    busy = (time.perf_counter() - t0) / 200
print("ready", flush=True)
sys.stdin.readline()
latencies, arrivals, k = [], 0, 1
start = time.perf_counter() + 1.0
while True:
    arrival = start + k * period
    k += 1
    if arrival - start >= span:
        break
    arrivals += 1
    now = time.perf_counter()
    if now > arrival:
        continue
    if arrival - now > 0.001:
        time.sleep(arrival - now - 0.001)
    while time.perf_counter() < arrival:
        pass
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    latencies.append(time.perf_counter() - arrival)
print(json.dumps({{"latencies": latencies, "arrivals": arrivals, "solo_request_s": busy}}))
"""


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered), max(1, int(-(-fraction * len(ordered) // 1)))) - 1]


def serve_beside(inference_env, trainer_envs, span, period=0.004):
    """One inference server and trainers released together; the server's result and each
    trainer's matmul rates (the trainers run one second longer than the server's span, which
    starts a second after the release)."""
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(INFERENCE_LOOP.format(period=period, span=span))],
                              env=inference_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    trainers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(MATMUL_LOOP.format(span=span + 2.0, window=0.25, graph=False))],
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for env in trainer_envs]
    for p in [server] + trainers:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"workload did not start: {line!r} {p.stderr.read()}")
    for p in [server] + trainers:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in [server] + trainers:
        stdout, stderr = p.communicate(timeout=span * 4 + 120)
        lines = [l for l in stdout.splitlines() if l.startswith("{")]
        if not lines:
            raise RuntimeError(f"workload failed: {stderr}")
        out.append(json.loads(lines[-1]))
    # The trainers' windows while the server served: from 1 s to 1 s + span.
    rates = [r["rates"][int(1.0 / 0.25):int((1.0 + span) / 0.25)] for r in out[1:]]
    return out[0], rates


def inference_checks(check, results, directory, uuid, limit, shim, span):
    board = os.path.join(directory, "board-inference")
    os.makedirs(board, exist_ok=True)

    def env_for(name, cores, priority):
        config = write_claim(directory, uuid, limit, name=name, cores=cores, priority=priority, policy="default")
        return dict(os.environ, LD_PRELOAD=shim, TESSERA_CONFIG=config, TESSERA_BOARD=board)

    bare = dict(os.environ)
    bare.pop("LD_PRELOAD", None)
    trainer_solo = mean(steady(run_loops([bare], span)[0]))
    rows = {}
    for name, server_env, trainer_envs in [
        ("inference alone", bare, []),
        ("+ 1 trainer, no shim", bare, [bare]),
        ("Tessera: inference high/30, trainer low/70", env_for("inference-high", 30, "high"), [env_for("trainer-low", 70, "low")]),
        ("two normal claims at 50/50", env_for("inference-normal", 50, "normal"), [env_for("trainer-normal", 50, "normal")]),
    ]:
        served, rates = serve_beside(server_env, trainer_envs, span)
        lat = served["latencies"]
        rows[name] = {
            "p50_ms": 1000 * percentile(lat, 0.5), "p99_ms": 1000 * percentile(lat, 0.99),
            "p999_ms": 1000 * percentile(lat, 0.999), "served": len(lat), "arrivals": served["arrivals"],
            "training_percent": 100 * sum(mean(r) for r in rates) / trainer_solo if rates else None,
            "solo_request_ms": 1000 * served["solo_request_s"],
        }
    results["inference"] = rows
    alone, prio = rows["inference alone"], rows["Tessera: inference high/30, trainer low/70"]
    used = alone["solo_request_ms"] / 4.0
    check("inference beside low training: p99 within 10 % of alone", prio["p99_ms"] <= 1.1 * alone["p99_ms"],
          {"alone_p99_ms": round(alone["p99_ms"], 3), "beside_p99_ms": round(prio["p99_ms"], 3)})
    check("low training beside inference gets ≥ 0.8 × what the inference leaves",
          prio["training_percent"] >= 80 * (1 - used),
          {"training_percent": round(prio["training_percent"], 1), "inference_uses": round(used, 3)})


SPILL_ALLOC = """
import json, sys, torch
chunk, count = {chunk}, {count}
held, results = [], []
for i in range(count):
    try:
        t = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    except torch.cuda.OutOfMemoryError:
        results.append("oom")
        break
    t.fill_(i % 251)
    held.append(t)
    results.append("ok")
# Every tensor, on the card or spilled, holds what a kernel wrote into it. (A claim held at its
# spill limit cannot allocate even the small result tensors: then None.)
try:
    correct = all(int(t[::4096].sum().item()) == (i % 251) * len(t[::4096]) for i, t in enumerate(held))
    x = torch.ones(chunk // 4, dtype=torch.float32, device="cuda")
    total = float(x.sum().item())
    torch.cuda.synchronize()
except torch.cuda.OutOfMemoryError:
    correct, total = None, None
print("held", flush=True)
print(json.dumps({{"results": results, "correct": correct, "sum": total}}), flush=True)
sys.stdin.readline()
"""


def region_totals(path):
    """(charged, spilled) on device 0 over the active slots of a region file (region.md)."""
    import struct
    with open(path, "rb") as f:
        data = f.read()
    high = struct.unpack_from("<I", data, 32)[0]
    used = spilled = 0
    for i in range(min(high, 256)):
        base = 4096 + 384 * i
        if struct.unpack_from("<I", data, base)[0] != 1:
            continue
        used += struct.unpack_from("<Q", data, base + 64)[0]
        spilled += struct.unpack_from("<Q", data, base + 192)[0]
    return used, spilled


def held_result(proc):
    """The JSON line SPILL_ALLOC prints once it holds its tensors, or the reason there is none."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    proc.wait(timeout=60)
    return {"results": ["crashed"], "correct": False, "sum": -1,
            "stderr": proc.stderr.read()[-500:], "rc": proc.returncode}


def spill_checks(check, results, directory, uuid, shim):
    """Bounded spill path check: never more managed memory than the card has free."""
    free = int(subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
        check=True, capture_output=True, text=True).stdout.strip()) * MIB
    chunk = 64 * MIB
    count = min(32, free // 4 // chunk) // 4 * 4
    if count < 8:
        results["spill"] = {"skipped": f"{free} bytes free on the card, 2 GiB needed"}
        return
    limit = chunk * count
    # Two chunks of headroom: one for the float tensor, one for PyTorch's small result tensors.
    asked = count - 2
    board = os.path.join(directory, "board")
    os.makedirs(board, exist_ok=True)

    def claim(name, oversubscribe, claim_limit, spill_limit=None):
        device = {"uuid": uuid, "memoryLimit": claim_limit, "cores": 100, "physicalMemory": limit // 2}
        if spill_limit is not None:
            device["spillLimit"] = spill_limit
        config = {"version": 1, "claimUid": name, "region": os.path.join(directory, f"{name}.region"),
                  "devices": [device], "oversubscribe": oversubscribe}
        path = os.path.join(directory, f"{name}.json")
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def env(config):
        return dict(os.environ, LD_PRELOAD=shim, TESSERA_CONFIG=config, TESSERA_BOARD=board,
                    PYTORCH_NO_CUDA_MEMORY_CACHING="1")

    # The claim that did not opt in reserves a quarter of the opted-in claim's limit while it runs.
    reserve = claim("spill-reserve", False, limit // 4)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER.format(size=MIB))],
                              env=env(reserve), stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    try:
        opted = claim("spill-opted", True, limit)
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SPILL_ALLOC.format(chunk=chunk, count=asked))],
                                env=env(opted), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        outcome = held_result(proc)
        used, spilled = region_totals(os.path.join(directory, "spill-opted.region"))
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.wait(timeout=120)
        # allowance = limit/2 (physical) − limit/4 (reserve): a quarter of the limit on the card,
        # the rest of the asked chunks and the float tensor (one chunk) spilled.
        expected = (asked + 1) * chunk - limit // 4
        results["spill"] = {"limit": limit, "outcome": outcome, "used": used, "spilled": spilled}
        check("spill: the opted-in claim gets all it asks, past the card", outcome["results"] == ["ok"] * asked, results["spill"])
        check("spill: kernels see the right bytes in spilled memory", outcome["correct"]
              and outcome["sum"] == chunk // 4, outcome)
        check("spill: the region's spilled bytes are what did not fit beside the reserve",
              expected <= spilled <= expected + chunk, {"spilled": spilled, "expected": expected})

        capped = claim("spill-capped", True, limit, spill_limit=limit // 4)
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SPILL_ALLOC.format(chunk=chunk, count=asked))],
                                env=env(capped), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        outcome = held_result(proc)
        _, stderr = proc.communicate(input="\n" if proc.poll() is None else None, timeout=120)
        check("spill: the spill limit is an out-of-memory error with the shim's line",
              outcome["results"][-1] == "oom" and "spill limit" in stderr,
              {"results": outcome["results"], "stderr": stderr[-300:]})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


BARE_CONTEXT = """
import json, os, subprocess, torch
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits", "-i", "0"],
                     capture_output=True, text=True).stdout
used = [int(u) for p, u in (l.split(",") for l in out.splitlines() if l.strip()) if int(p) == os.getpid()]
print(json.dumps({{"used_mib": used[0] if used else None}}))
"""

FILL_AND_REPORT = """
import json, os, subprocess, torch
step = 64 << 20
held = []
try:
    while True:
        held.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
except torch.cuda.OutOfMemoryError:
    pass
torch.cuda.synchronize()
env = dict(os.environ)
env.pop("LD_PRELOAD", None)
# The card's own accounting: nvidia-smi without the shim.
out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits", "-i", "0"],
                     capture_output=True, text=True, env=env).stdout
used = [int(u) for p, u in (l.split(",") for l in out.splitlines() if l.strip()) if int(p) == os.getpid()]
print(json.dumps({{"allocated": len(held) * step, "card_used_mib": used[0] if used else None}}))
"""


def byte_checks(check, results, directory, uuid, limit, shim, probe, hook):
    """Section 9: the probe's context figure, a claim charged it, and the driver's wall."""
    report = json.loads(subprocess.run([probe], check=True, capture_output=True, text=True).stdout)
    mine = [g for g in report["gpus"] if g["uuid"] == uuid]
    wall = [w for w in report.get("driverWalls", []) if w["uuid"] == uuid]
    context = mine[0]["contextOverhead"] if mine else None
    bare = last_json(run_python(BARE_CONTEXT.format(), dict(os.environ)))
    results["bytes"] = {"probe": report, "torch_bare_mib": bare["used_mib"]}
    check("the probe measures a context on GPU 0", context is not None and context > 0, report)
    if context is None:
        return
    check("a bare PyTorch process takes at least the probe's context",
          bare["used_mib"] is not None and bare["used_mib"] * MIB >= context, bare)
    config = write_claim(directory, uuid, limit, name="bytes", context_overhead=context)
    shimmed = dict(os.environ, LD_PRELOAD=shim, TESSERA_CONFIG=config, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    filled = last_json(run_python(FILL_AND_REPORT.format(), shimmed))
    results["bytes"]["filled"] = filled
    used = (filled["card_used_mib"] or 0) * MIB
    # What the probe's bare context does not include: PyTorch's module images, loaded lazily.
    images = max(0, (bare["used_mib"] or 0) * MIB - context)
    check("a filled claim holds no more of the card than its wall (plus module images)",
          0 < used <= limit + images + 64 * MIB, {"card_used": used, "limit": limit, "module_images": images})
    if hook is None or not wall or not wall[0]["supported"]:
        results["bytes"]["driver_wall"] = wall[0] if wall else None
        return
    if os.geteuid() != 0:
        check("the driver's wall (needs root)", False, "run as root to check the driver's wall")
        return
    cgroup = "/sys/fs/cgroup/tessera-validate-%d" % os.getpid()
    os.mkdir(cgroup)
    try:
        code = textwrap.dedent(FILL_AND_REPORT.format())
        child = subprocess.Popen(
            ["sh", "-c", 'echo $$ > %s/cgroup.procs && read go && exec "$0" -c "$1"' % cgroup, sys.executable, code],
            env=dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1"), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        state = json.dumps({"ociVersion": "1.2.0", "id": "validate", "status": "creating", "pid": child.pid, "bundle": "/"})
        hooked = subprocess.run([hook, "memory-limit", "--limit", f"{uuid}={limit}"], input=state,
                                capture_output=True, text=True)
        check("tessera-cdi-hook sets the driver's limit", hooked.returncode == 0, hooked.stderr.strip())
        child.stdin.write("go\n")
        child.stdin.flush()
        out, _ = child.communicate(timeout=300)
        last = [l for l in out.splitlines() if l.startswith("{")]
        bypass = json.loads(last[-1]) if last else {}
        results["bytes"]["driver_wall"] = bypass
        check("without the shim, the driver stops a process at the claim's limit",
              0 < bypass.get("allocated", 0) <= limit, bypass)
    finally:
        os.rmdir(cgroup)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shim", required=True)
    parser.add_argument("--limit-gib", type=float, default=2.0)
    parser.add_argument("--json")
    parser.add_argument("--no-compute", action="store_true", help="skip the compute-share checks")
    parser.add_argument("--no-spill", action="store_true", help="skip the memory oversubscription checks")
    parser.add_argument("--no-inference", action="store_true", help="skip inference beside training")
    parser.add_argument("--span", type=float, default=6.0, help="seconds per compute run")
    parser.add_argument("--probe", help="tessera-gpu-probe: check every byte counted (section 9)")
    parser.add_argument("--hook", help="tessera-cdi-hook: with --probe, check the driver's wall where it exists")
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

        if not args.no_spill:
            spill_checks(check, results, directory, uuid, os.path.abspath(args.shim))

        if not args.no_compute:
            compute_checks(check, results, directory, uuid, limit, os.path.abspath(args.shim), args.span)

        if not args.no_inference:
            inference_checks(check, results, directory, uuid, limit, os.path.abspath(args.shim), args.span)

        if args.probe:
            byte_checks(check, results, directory, uuid, limit, os.path.abspath(args.shim), args.probe, args.hook)

    print("| check | result | detail |\n|---|---|---|")
    for c in results["checks"]:
        print(f"| {c['check']} | {'pass' if c['passed'] else 'FAIL'} | `{json.dumps(c['detail'])[:120]}` |")
    o = results["overhead"]
    print(f"\n| measure | no shim | shim |\n|---|---|---|")
    print(f"| fp16 4096² matmul (ms) | {o['bare']['matmul_ms']:.3f} | {o['shim']['matmul_ms']:.3f} |")
    print(f"| 1 MiB alloc+free, caching off (µs) | {o['bare']['alloc_free_us']:.1f} | {o['shim']['alloc_free_us']:.1f} |")
    if "compute" in results:
        c = results["compute"]
        print(f"\n| cores | achieved (% of solo throughput, mean after 1 s) |\n|---|---|")
        for cores, r in c["shares"].items():
            print(f"| {cores} | {r['mean']:.1f} |")
        print(f"| 30 (CUDA graph) | {c['graph_30']:.1f} |")
        p = c["pair_25_40"]
        print(f"\n25 + 40 side by side: {p['a']:.1f} % and {p['b']:.1f} %, ratio {p['ratio']:.3f} (0.625 asked)")
        q = c["priority"]
        print(f"high priority beside two low: {100 * q['high_beside_lows'] / q['high_solo']:.1f} % of its solo throughput")
    if "inference" in results:
        print("\n| setup | inference p50 / p99 / p99.9 (ms) | requests served | training's share |\n|---|---|---|---|")
        for name, r in results["inference"].items():
            share = "–" if r["training_percent"] is None else f"{r['training_percent']:.0f} %"
            print(f"| {name} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} / {r['p999_ms']:.2f} | {r['served']} of {r['arrivals']} | {share} |")
    if "bytes" in results:
        b = results["bytes"]
        print(f"\n| every byte | value |\n|---|---|")
        for g in b["probe"]["gpus"]:
            print(f"| context (tessera-gpu-probe, {g['method']}) on {g['uuid']} | {g['contextOverhead'] / MIB:.0f} MiB |")
        print(f"| bare PyTorch process (nvidia-smi) | {b['torch_bare_mib']} MiB |")
        if "filled" in b:
            print(f"| filled claim, the card's own figure | {b['filled']['card_used_mib']} MiB of a {limit / MIB:.0f} MiB wall |")
        print(f"| driver's wall | {json.dumps(b.get('driver_wall'))} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
