"""The API's overhead: a 10-step 64x64 txt2img through the HTTP API against calling the
same diffusers pipeline directly (target: the API adds at most 10%).

Both sides use the same loaded pipeline (tiny SD 1.x), sampler (Euler a), seed, CFG and
torch threads; the API side adds what a client pays for: HTTP and JSON, the queue and its
worker thread, the step callback (progress, interrupt), PNG encoding with the infotext,
the atomic save of the image to outputs/ (fsync) and base64. Runs alternate, median.

Run: .venv/bin/python benchmarks/bench_webui.py
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from common import Row, write_result

RUNS, WARMUP = 25, 2
STEPS, SIZE = 10, 64


def main() -> None:
    import torch

    from fastsd.webui.server import serve, shutdown

    torch.set_num_threads(1)  # this machine's 2 cores are shared: threads fight otherwise
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["FASTSD_HOME"] = tmp
        server = serve(model="tiny-sd1", root=root, port=0)
        worker = server.app.state.worker
        pipe = worker.engine.pipeline("txt2img")
        body = {"prompt": "a photo of sks cat", "negative_prompt": "", "steps": STEPS,
                "width": SIZE, "height": SIZE, "cfg_scale": 7, "sampler_name": "Euler a"}

        def api(seed: int) -> float:
            data = json.dumps({**body, "seed": seed}).encode()
            req = urllib.request.Request(f"{server.url}/sdapi/v1/txt2img", data=data,
                                         headers={"Content-Type": "application/json"})
            start, cpu = time.perf_counter(), time.process_time()
            with urllib.request.urlopen(req, timeout=300) as r:
                answer = json.loads(r.read())
            elapsed = time.perf_counter() - start, time.process_time() - cpu
            assert len(answer["images"]) == 1
            return elapsed

        def direct(seed: int) -> float:
            from fastsd.webui import samplers

            start, cpu = time.perf_counter(), time.process_time()
            pipe.scheduler = samplers.build(pipe.scheduler.config,
                                            *samplers.resolve("Euler a"))
            with torch.inference_mode():
                image = pipe(body["prompt"], negative_prompt="", num_inference_steps=STEPS,
                             width=SIZE, height=SIZE, guidance_scale=7,
                             generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            elapsed = time.perf_counter() - start, time.process_time() - cpu
            assert image.size == (SIZE, SIZE)
            return elapsed

        times: dict[str, list[float]] = {"api": [], "direct": []}
        cpu: dict[str, list[float]] = {"api": [], "direct": []}
        try:
            for i in range(WARMUP + RUNS):
                for name, fn in (("api", api), ("direct", direct)) if i % 2 else \
                        (("direct", direct), ("api", api)):
                    t, c = fn(i)
                    if i >= WARMUP:
                        times[name].append(t)
                        cpu[name].append(c)
        finally:
            server.stop()
            shutdown()
    ours, base = statistics.median(times["api"]), statistics.median(times["direct"])
    paired = statistics.median(a / d for a, d in zip(times["api"], times["direct"]))
    cpu_ours, cpu_base = statistics.median(cpu["api"]), statistics.median(cpu["direct"])
    print(f"API {ours * 1000:.1f} ms, direct {base * 1000:.1f} ms; paired ratio {paired:.3f}; "
          f"CPU {cpu_ours * 1000:.1f} vs {cpu_base * 1000:.1f} ms")
    rows = [Row(f"{STEPS}-step {SIZE}x{SIZE} txt2img, tiny SD 1.x on CPU: wall time per "
                "request, median of runs", "ms", round(ours * 1000, 1), round(base * 1000, 1),
                higher_is_better=False),
            Row("wall time, median of the paired ratios API/direct", "x", round(paired, 3),
                1.0, target="<= 1.10 (API adds <= 10%)", higher_is_better=False,
                passed=paired <= 1.10),
            Row("CPU time per request (process, both sides in one process)", "ms",
                round(cpu_ours * 1000, 1), round(cpu_base * 1000, 1), higher_is_better=False)]
    write_result("webui", "A1111-compatible API: HTTP request vs calling the pipeline", rows,
                 command=".venv/bin/python benchmarks/bench_webui.py",
                 notes=f"{RUNS} alternating pairs of runs after {WARMUP} warm-up pairs; the "
                 "target is graded on the median of each pair's ratio, which cancels the drift "
                 "of a shared machine's load. One torch thread on both sides. Same loaded "
                 "pipeline, sampler (Euler a), CFG 7 and seeds; the API side adds HTTP+JSON, "
                 "the queue and worker thread, the step callback, PNG encoding with the "
                 "infotext, the atomic (fsynced) save to outputs/ and base64. Wall times: "
                 f"API {[round(t * 1000) for t in times['api']]} ms, "
                 f"direct {[round(t * 1000) for t in times['direct']]} ms.")


if __name__ == "__main__":
    main()
