"""MaskAttn's sampling overhead against plain ComfyUI: same model, seed and prompt, one process.

    .venv/bin/python benchmarks/sampling.py --config tiny
    .venv/bin/python benchmarks/sampling.py --config sdxl-512 --checkpoint sdxl_random.safetensors --threads 1
    .venv/bin/python benchmarks/sampling.py --checkpoint CKPT   # every configuration this machine can run

Each configuration runs in a fresh worker process (so one model's memory never colours
another's). The worker loads the model once, runs each variant once for one step (warm-up),
then samples through `comfy.sample.sample` (euler, normal schedule, cfg 5, seed 0, the same
random prompt) in rounds where every patched run sits between two unpatched runs and the
variants' order rotates (U A U B U, then U B U A U, ...). Each patched run's time is divided
by the mean of its two unpatched neighbours, which cancels a slow drift of the machine's speed;
the table gives the median of those ratios with their min-max spread, for wall time and for the
process's CPU time (user + system, all threads), and the ratio of the fastest runs.
On a shared machine CPU time with --threads 1 is the steadier figure: it does not count time
spent waiting for a core, and one thread has no spinning OpenMP workers to inflate it.

Memory, in rounds of their own after the timed ones (--memory-rounds, U A U B U ...). CUDA:
`torch.cuda.max_memory_allocated` over each run. CPU: torch has no allocator statistics, so the
worker reads the process's resident high-water mark (VmHWM, reset before each run through
/proc/self/clear_refs) after telling glibc (mallopt) to serve every block of 256 KiB or more
by mmap, so that freed tensors leave the resident set and the high-water mark follows live
tensors, not the allocator's free lists. That setting makes every large allocation cost page
faults (a 30% slower SDXL block here), so no timed run is made under it. The table gives the
patched run's peak minus the mean of its unpatched neighbours' peaks, in MiB and as a share of
the unpatched peak (whole process, weights included) and of the unpatched run's working memory
(peak minus the resident size before the run).

Not part of the test suite; numbers and conditions go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# variant: PatchOptions keywords, or None for plain ComfyUI
VARIANTS = {
    "unpatched": None,
    "default gates": {},
    "strength 0": {"strength": 0.0},
    "outside step range": {"start_percent": 1.0, "end_percent": 1.0},  # sigma range [0, 0]: no step falls in it
}
# name: model ("tiny" or "checkpoint"), image side in pixels, steps, rounds, device, variants measured
# (strength 0 and the empty step range cost the same Python on any model: the tiny one, where that
# Python weighs most, measures them; --variants adds them to the slow configurations).
CONFIGS = {
    "tiny": dict(model="tiny", size=512, steps=4, rounds=9, device="cpu", variants=list(VARIANTS)),
    "sdxl-512": dict(model="checkpoint", size=512, steps=1, rounds=8, device="cpu",
                     variants=["unpatched", "default gates"]),
    "sdxl-1024-cuda": dict(model="checkpoint", size=1024, steps=20, rounds=5, device="cuda", variants=list(VARIANTS)),
}
CFG = 5.0  # > 1, so each model call carries both conds, as in ordinary use
MMAP_THRESHOLD = 256 * 1024
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


# -- memory probes ---------------------------------------------------------------------------
class ResidentPeak:
    """Peak resident memory of this process during a run (Linux, glibc).

    Made after the timed runs: from here on glibc serves every block of MMAP_THRESHOLD bytes or
    more by mmap and unmaps it when freed, so the high-water mark follows live tensors rather
    than the allocator's free lists. (That makes each large allocation cost page faults, which is
    why no timed run happens under it.)
    """

    def __init__(self):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if not hasattr(libc, "mallopt"):
            raise RuntimeError("peak memory on the CPU needs glibc (mallopt)")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD)
        libc.malloc_trim(0)

    def start(self):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current VmRSS
        self.before = self._field("VmRSS")

    def stop(self) -> tuple[int, int]:
        """(peak bytes, peak bytes above the size at start)."""
        peak = self._field("VmHWM")
        return peak, peak - self.before

    @staticmethod
    def _field(name: str) -> int:
        with open("/proc/self/status") as handle:
            return int(re.search(rf"^{name}:\s+(\d+) kB", handle.read(), re.M).group(1)) * 1024


class CudaPeak:
    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def start(self):
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        self.before = self.torch.cuda.memory_allocated(self.device)

    def stop(self) -> tuple[int, int]:
        self.torch.cuda.synchronize(self.device)
        peak = self.torch.cuda.max_memory_allocated(self.device)
        return peak, peak - self.before



class InRunClock:
    """Seconds each run spends in MaskAttn's gate hook and in ComfyUI's cross-attention calls.

    A shared CPU's speed drifts by several percent between runs a minute apart, far more than
    the gates cost; this clock divides a run from the inside, so it is immune to that drift:
    MaskAttn's own time is the gate hook plus what its mask adds to cross-attention (the share
    of the patched run spent in cross-attention beyond the share its unpatched neighbours
    spent there; shares, so that the machine's speed cancels). Everything else a
    patched model call runs is the same code as the unpatched one. CPU only: on CUDA the
    per-call synchronisation it would need would itself cost time.
    """

    def __init__(self):
        import comfy.ldm.modules.attention as attention
        from maskattn_comfy.patch import MaskAttnPatch

        self.gate_s = self.cross_s = 0.0
        gate = MaskAttnPatch.__call__

        def timed_gate(patch, *args):
            started = time.perf_counter()
            try:
                return gate(patch, *args)
            finally:
                self.gate_s += time.perf_counter() - started

        MaskAttnPatch.__call__ = timed_gate
        for name in ("optimized_attention", "optimized_attention_masked"):  # both are looked up at call time
            setattr(attention, name, self._timed_attention(getattr(attention, name)))

    def _timed_attention(self, attend):
        def timed(q, k, v, *args, **kwargs):
            if q.shape[-2] == k.shape[-2]:  # self-attention: the same in both variants
                return attend(q, k, v, *args, **kwargs)
            started = time.perf_counter()
            try:
                return attend(q, k, v, *args, **kwargs)
            finally:
                self.cross_s += time.perf_counter() - started
        return timed

    def read(self) -> tuple[float, float]:
        """(gate hook seconds, cross-attention seconds) since the last read."""
        reading, self.gate_s, self.cross_s = (self.gate_s, self.cross_s), 0.0, 0.0
        return reading

# -- the worker: one configuration in this process -------------------------------------------
def run_worker(name: str, config: dict, checkpoint: str | None, steps: int, rounds: int, variants: list[str],
               threads: int | None, memory_rounds: int = 2) -> dict:
    sys.path.insert(0, str(REPO))
    from maskattn_comfy import host

    host.boot(cpu=config["device"] == "cpu")
    import torch

    if threads:
        torch.set_num_threads(threads)

    import comfy.sd
    from maskattn_comfy.tiny_model import build_sdxl_model

    started = time.perf_counter()
    if config["model"] == "tiny":
        model = build_sdxl_model()
    else:
        model = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False,
                                                      output_clipvision=False)[0]
    load_s = time.perf_counter() - started
    result = measure(name, model, config["size"], steps, rounds, variants, memory_rounds)
    result["load_s"] = load_s
    return result


def measure(name: str, model, size: int, steps: int, rounds: int, variants: list[str], memory_rounds: int = 2) -> dict:
    """Sample `model` (a ComfyUI MODEL) unpatched and with each patched variant in the interleaved
    schedule, then peak memory in rounds of its own; `variants` starts with "unpatched"."""
    import torch

    import comfy.model_management as mm
    import comfy.sample
    from maskattn_comfy.model_check import require_sdxl
    from maskattn_comfy.patch import PatchOptions, apply_maskattn
    from maskattn_comfy.tiny_model import tiny_conditioning
    from maskattn_core import GateSet, MaskAttnConfig

    gate_set = GateSet.create(MaskAttnConfig(), require_sdxl(model), seed=0)  # the authors' defaults
    models = {variant: model if VARIANTS[variant] is None
              else apply_maskattn(model, gate_set, PatchOptions(**VARIANTS[variant]))
              for variant in variants}

    positive = tiny_conditioning(seed=1, width=size, height=size)
    negative = tiny_conditioning(seed=2, width=size, height=size)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    device = mm.get_torch_device()
    clock = InRunClock() if device.type == "cpu" else None

    def run(variant: str, run_steps: int):
        t0, c0 = time.perf_counter(), time.process_time()
        out = comfy.sample.sample(models[variant], noise, run_steps, CFG, "euler", "normal", positive, negative,
                                  latent, disable_pbar=True, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, time.process_time() - c0, out

    for variant in variants:  # warm-up: first-call allocations, lazy imports, model loading
        run(variant, 1)
    if clock:
        clock.read()  # drop the warm-up's seconds; each read below starts the next run's count
    runs, outputs = [], {}
    for position, variant in enumerate(schedule(variants[1:], rounds)):
        seconds, cpu_seconds, out = run(variant, steps)
        gate_s, cross_s = clock.read() if clock else (math.nan, math.nan)
        runs.append({"variant": variant, "wall_s": seconds, "cpu_s": cpu_seconds, "gate_s": gate_s, "cross_s": cross_s,
                     "cross_share": cross_s / seconds})
        outputs.setdefault(variant, out)
        print(f"  {name} run {position} {variant}: {seconds:.3f} s wall, {cpu_seconds:.3f} s CPU, gate hook "
              f"{gate_s:.3f} s, cross-attention {cross_s:.3f} s [load {os.getloadavg()[0]:.1f}]",
              file=sys.stderr, flush=True)

    # Peak memory: more rounds (U A U B U ...), after the timed ones.
    probe = CudaPeak(torch, device) if device.type == "cuda" else ResidentPeak()
    memory = []
    for variant in schedule(variants[1:], memory_rounds):
        probe.start()
        run(variant, steps)
        peak, working = probe.stop()
        memory.append({"variant": variant, "peak": peak, "working": working})
        print(f"  {name} memory {variant}: peak {peak / 2**20:.1f} MiB (+{working / 2**20:.1f} MiB)",
              file=sys.stderr, flush=True)

    unpatched = [run for run in runs if run["variant"] == "unpatched"]
    unpatched_memory = [run for run in memory if run["variant"] == "unpatched"]
    result = {"config": name, "device": str(device), "dtype": str(model.model.get_dtype()),
              "size": size, "steps": steps, "rounds": rounds, "cfg": CFG,
              "gated_layers": len(gate_set.layers), "gate_parameters": gate_set.parameter_count(),
              "unpatched_s": statistics.median(r["wall_s"] for r in unpatched),
              "unpatched_cpu_s": statistics.median(r["cpu_s"] for r in unpatched),
              "unpatched_peak_mib": statistics.median(r["peak"] for r in unpatched_memory) / 2**20,
              "unpatched_working_mib": statistics.median(r["working"] for r in unpatched_memory) / 2**20,
              "threads": torch.get_num_threads(), "runs": runs, "memory_runs": memory, "variants": {}}
    for variant in variants[1:]:
        pairs = bracketed(runs, variant, ("wall_s", "cpu_s", "cross_share"))
        ratios = [r["wall_s"] / base["wall_s"] for r, base in pairs]
        # MaskAttn's share of a patched run: its gate hook, plus the share cross-attention takes beyond the
        # share it takes in the unpatched neighbours. Shares, not seconds, so the machine's speed cancels.
        own = [1 / (1 - (r["gate_s"] / r["wall_s"] + r["cross_share"] - base["cross_share"])) for r, base in pairs]
        cpu_ratios = [r["cpu_s"] / base["cpu_s"] for r, base in pairs]
        extra = [(r["peak"] - base["peak"], base) for r, base in bracketed(memory, variant, ("peak", "working"))]
        extra_bytes, base = sorted(extra, key=lambda e: e[0])[len(extra) // 2]  # the median run
        result["variants"][variant] = {
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "fastest_ratio": min(r["wall_s"] for r, _ in pairs) / min(r["wall_s"] for r in unpatched),
            "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios),
            "cpu_ratio_max": max(cpu_ratios), "ratios": ratios, "cpu_ratios": cpu_ratios,
            "own_ratio_median": statistics.median(own), "own_ratio_min": min(own), "own_ratio_max": max(own),
            "peak_extra_mib": extra_bytes / 2**20, "peak_extra_share": extra_bytes / base["peak"],
            "peak_extra_working_share": extra_bytes / base["working"],
            "same_output_as_unpatched": bool(torch.equal(outputs[variant], outputs["unpatched"])),
        }
    return result


def schedule(patched: list[str], rounds: int) -> list[str]:
    """The run order: every patched run between two unpatched ones, the variants' order rotated
    each round (U A U B U C U, then U B U C U A U, ...), so a slow drift of the machine's speed
    cancels in each patched run's comparison with the mean of its two neighbours."""
    order = ["unpatched"]
    for r in range(rounds):
        shift = r % len(patched)
        for variant in patched[shift:] + patched[:shift]:
            order += [variant, "unpatched"]
    return order


def bracketed(runs: list[dict], variant: str, fields: tuple[str, ...]) -> list[tuple[dict, dict]]:
    """Each run of `variant` with the mean of its two unpatched neighbours (see `schedule`)."""
    return [(run, {f: (runs[i - 1][f] + runs[i + 1][f]) / 2 for f in fields})
            for i, run in enumerate(runs) if run["variant"] == variant]


# -- the driver ------------------------------------------------------------------------------
def spawn(name: str, args) -> dict | None:
    config = CONFIGS[name]
    command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps or config["steps"]),
               "--rounds", str(args.rounds or config["rounds"]), "--memory-rounds", str(args.memory_rounds), "--variants", *(args.variants or config["variants"])]
    if args.checkpoint:
        command += ["--checkpoint", str(args.checkpoint)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(f"{name}: worker failed with exit status {done.returncode}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def skip_reason(name: str, args) -> str | None:
    config = CONFIGS[name]
    if config["model"] == "checkpoint" and not args.checkpoint:
        return "no --checkpoint given"
    if config["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device here"
    return None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = re.search(r"^model name\s*:\s*(.+)$", handle.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            kib = int(re.search(r"MemTotal:\s+(\d+)", handle.read()).group(1))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    load = ", load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{memory}{load}"


def table(results: list[dict]) -> str:
    lines = ["| configuration | variant | wall time patched/unpatched, median (min-max) | CPU time ratio, median "
             "(min-max) | fastest runs, wall | 1 + MaskAttn's own time in the run, median (min-max) "
             "| unpatched s/run (wall, CPU) | peak memory difference | output = unpatched |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        where = f"{res['config']} ({res['device']}, {res['dtype'].replace('torch.', '')}, {res['size']}px, " \
                f"{res['steps']} steps, cfg {res['cfg']:g}, {res['rounds']} rounds, {res['threads']} threads)"
        for variant, v in res["variants"].items():
            own = "n/a" if math.isnan(v["own_ratio_median"]) else \
                f"{v['own_ratio_median']:.4f} ({v['own_ratio_min']:.4f}-{v['own_ratio_max']:.4f})"
            lines.append(f"| {where} | {variant} | {v['ratio_median']:.4f} ({v['ratio_min']:.4f}-{v['ratio_max']:.4f}) "
                         f"| {v['cpu_ratio_median']:.4f} ({v['cpu_ratio_min']:.4f}-{v['cpu_ratio_max']:.4f}) "
                         f"| {v['fastest_ratio']:.4f} | {own} "
                         f"| {res['unpatched_s']:.2f}, {res['unpatched_cpu_s']:.2f} "
                         f"| {v['peak_extra_mib']:+.1f} MiB ({100 * v['peak_extra_share']:+.2f}% "
                         f"of {res['unpatched_peak_mib']:.0f} MiB; {100 * v['peak_extra_working_share']:+.1f}% of the "
                         f"{res['unpatched_working_mib']:.0f} MiB working set) "
                         f"| {'yes' if v['same_output_as_unpatched'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--checkpoint", type=Path, help="an SDXL .safetensors (e.g. from make_random_sdxl.py)")
    parser.add_argument("--steps", type=int, help="override the configuration's steps")
    parser.add_argument("--rounds", type=int, help="override the configuration's rounds")
    parser.add_argument("--memory-rounds", type=int, default=2, help="rounds measuring peak memory (default 2)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="override the configuration's variants (unpatched is always run)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        config = CONFIGS[args.worker]
        variants = ["unpatched"] + [v for v in args.variants or config["variants"] if v != "unpatched"]
        result = run_worker(args.worker, config, str(args.checkpoint) if args.checkpoint else None,
                            args.steps or config["steps"], args.rounds or config["rounds"], variants, args.threads,
                            args.memory_rounds)
        print(json.dumps(result))
        return

    print(f"machine: {machine()}", flush=True)
    results = []
    for name in args.config:
        reason = skip_reason(name, args)
        if reason:
            print(f"{name}: not measured ({reason})", flush=True)
            continue
        print(f"{name}: running ...", flush=True)
        result = spawn(name, args)
        if result is not None:
            results.append(result)
            print(table([result]), flush=True)
    print(f"\nmachine after the runs: {machine()}\n")
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
