"""The GPU check: one command that measures what a lent GPU can tell us, into one JSON file.

    python -m tools.gpu_check --out $OUT/gpu_check.json              # a CUDA GPU: at most ~8 minutes
    python -m tools.gpu_check --rehearse --out /tmp/gpu_check.json   # the CPU, tiny sizes: the same steps

It needs no network: a random full-size checkpoint is written first. Each part runs train.py or
edit.py as a user would, in a process of its own, and records its exit code, time and peak memory
(the GPU's, allocated and reserved, and the process's RSS). A part that fails is recorded as failed
and the check goes on. The parts:

  device      the GPU, driver, torch, date and commit
  gpu_tier    python -m pytest --gpu -m gpu tests/test_gpu.py
  train       train.py at full size, every weight and --lora 8: a few steps, killed with SIGKILL after
              a save, then --resume to the end
  edit        edit.py at 512 x 512 (50 steps) and 2048 x 2048 (2 steps)
  caps        the same runs, short, under 8, 16 and 24 GB (torch.cuda.set_per_process_memory_fraction):
              what fits the smaller cards
  bench       tools.bench's UNet pass, edit and training step against diffusers (if installed)

The rehearsal (tests/test_gpu_check.py, default tier) runs every part on the CPU with the tiny model,
so that the one device run cannot fail on a typo.
"""
import argparse
import datetime
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(HERE, "examples", "cat.png")
PROMPT = "a photo of a [*] cat"
CAPS_GB = (8, 16, 24)
FIELDS = ("device", "gpu_tier", "train", "edit", "caps", "bench")  # what the JSON holds, each part's result


# ---------------------------------------------------------------------------------------------
# One script run, measured: `python -m tools.gpu_check --measure REPORT CAP_GB script.py args...`

def measure(report, cap_gb, script, args):
    """Run script as __main__ under a memory cap (CUDA only), then write its exit code and peaks to report."""
    import torch
    cuda = os.environ.get("SINE_DEVICE") == "cuda"  # set by main(): the rehearsal never touches a GPU
    if cuda and cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total))
    sys.argv = [script, *args]
    began, code = time.perf_counter(), 0
    try:
        runpy.run_path(os.path.join(HERE, script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    result = {"rc": code, "seconds": round(time.perf_counter() - began, 2), "peak_rss_gb": peak_rss_gb()}
    if cuda:
        result |= {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                   "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    with open(report, "w") as f:
        json.dump(result, f)


def peak_rss_gb():
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # kB on Linux


def run(script, *args, cap_gb=0, timeout=600, until=None):
    """script in a process of its own, measured; until(): a condition on which to SIGKILL it instead."""
    report = tempfile.mktemp(suffix=".json")
    command = [sys.executable, "-m", "tools.gpu_check", "--measure", report, str(cap_gb), script, *map(str, args)]
    process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    began = time.perf_counter()
    if until:
        while process.poll() is None and not until() and time.perf_counter() - began < timeout:
            time.sleep(0.05)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    result = {"rc": process.returncode, "seconds": round(time.perf_counter() - began, 2)}
    if os.path.exists(report):
        with open(report) as f:
            result |= json.load(f)
        os.remove(report)
    if result["rc"] != 0:
        result["stderr"] = stderr.strip().splitlines()[-3:]
    return result


# ---------------------------------------------------------------------------------------------
# The parts

def device_part(args):
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                     text=True).stdout.strip() or "unknown"}
    if not args.rehearse:
        props = torch.cuda.get_device_properties(0)
        info |= {"name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                 "memory_gb": round(props.total_memory / 2**30, 1)}
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip()
    else:
        info["name"] = "cpu (rehearsal)"
    return info


def gpu_tier_part(args):
    flags = [] if args.rehearse else ["--gpu"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", *flags, "tests/test_gpu.py"], cwd=HERE,
                            capture_output=True, text=True)
    return {"rc": result.returncode, "summary": (result.stdout.strip().splitlines() or [""])[-1]}


def train_runs(args, work, name, steps, extra=(), cap_gb=0, kill_after=None):
    """train.py for `steps`; with kill_after, SIGKILL once its step-kill_after save is on disk, then --resume."""
    out = os.path.join(work, f"{name}.safetensors")
    command = ["train.py", PHOTO, PROMPT, "--base", args.base, "--out", out, "--steps", steps, "--overwrite",
               "--no-keep-state", *extra]  # 11.8 GB a state: the disk holds few
    if not kill_after:
        return {"run": run(*command, cap_gb=cap_gb)}
    state = os.path.splitext(out)[0] + ".resume.safetensors"
    killed = run(*command, "--save-every", kill_after, until=lambda: os.path.exists(state))
    resumed = run(*[a for a in command if a != "--overwrite"], "--save-every", kill_after, "--resume")
    return {"killed": killed, "resumed": resumed, "step_seconds": step_seconds(out)}


def step_seconds(out):
    """The median time of a training step, from train.py's loss log."""
    import csv
    import statistics
    with open(os.path.splitext(out)[0] + ".loss.csv") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f) if row["seconds"]]
    return round(statistics.median(seconds), 4) if seconds else None


def edit_run(args, work, finetuned, size, steps, cap_gb=0):
    return run("edit.py", "--base", args.base, "--finetuned", finetuned, "--target", "... covered by snow",
               "--height", size, "--width", size, "--steps", steps, "--out", os.path.join(work, "edits"), cap_gb=cap_gb)


def train_part(args, work):
    steps, every = (10, 2) if args.rehearse else (6, 3)
    return {"full": train_runs(args, work, "full", steps, kill_after=every),
            "lora8": train_runs(args, work, "lora8", steps, ["--lora", 8], kill_after=every)}


def edit_part(args, work):
    small, big = (128, 256) if args.rehearse else (512, 2048)
    return {f"{small}": edit_run(args, work, args.finetuned, small, 5 if args.rehearse else 50),
            f"{big}": edit_run(args, work, args.finetuned, big, 2)}


def caps_part(args, work):
    small, big = (128, 256) if args.rehearse else (512, 2048)
    caps = {}
    for cap in CAPS_GB[:1] if args.rehearse else CAPS_GB:
        caps[f"{cap}GB"] = {
            f"edit {small}": edit_run(args, work, args.finetuned, small, 2, cap),
            f"edit {big}": edit_run(args, work, args.finetuned, big, 2, cap),
            "train full": train_runs(args, work, f"cap{cap}", 2, cap_gb=cap)["run"],
            "train lora8": train_runs(args, work, f"cap{cap}-lora", 2, ["--lora", 8], cap_gb=cap)["run"]}
    return caps


def bench_part(args, work):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return {"skipped": "diffusers is not installed: carry its wheel"}
    json_path = os.path.join(work, "bench.json")
    flags = (["--tiny", "--device", "cpu", "--only", "load"] if args.rehearse else  # the cheapest job, to rehearse
             ["--device", "cuda", "--only", "unet,edit,train"])
    result = subprocess.run([sys.executable, "-m", "tools.bench", *flags, "--repeats", "2", "--json", json_path],
                            cwd=HERE, capture_output=True, text=True, timeout=480)
    if result.returncode != 0 or not os.path.exists(json_path):
        return {"rc": result.returncode, "stderr": result.stderr.strip().splitlines()[-3:]}
    with open(json_path) as f:
        return {"rc": 0, **json.load(f)}


def prepare(args, work):
    """A random checkpoint (full size, or tiny for the rehearsal) and a fine-tuned file from 1 step."""
    args.base = os.path.join(work, "random.safetensors")
    subprocess.run([sys.executable, "-m", "model.tiny", args.base, *([] if args.rehearse else ["--full"])],
                   cwd=HERE, check=True, capture_output=True)
    args.finetuned = os.path.join(work, "one-step.safetensors")
    subprocess.run([sys.executable, "train.py", PHOTO, PROMPT, "--base", args.base, "--out", args.finetuned,
                    "--steps", "1", "--no-keep-state"], cwd=HERE, check=True, capture_output=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        return measure(argv[1], float(argv[2]), argv[3], argv[4:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--rehearse", action="store_true", help="on the CPU, at tiny sizes")
    p.add_argument("--work", help="folder for the checkpoints and outputs (default: a temporary one)")
    p.add_argument("--parts", nargs="+", choices=FIELDS, default=list(FIELDS), help="which parts (default: all)")
    args = p.parse_args(argv)
    os.environ["SINE_DEVICE"] = "cpu" if args.rehearse else "cuda"
    work = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    os.makedirs(work, exist_ok=True)
    began, results = time.perf_counter(), {}
    prepare(args, work)
    parts = {"device": lambda: device_part(args), "gpu_tier": lambda: gpu_tier_part(args),
             "train": lambda: train_part(args, work), "edit": lambda: edit_part(args, work),
             "caps": lambda: caps_part(args, work), "bench": lambda: bench_part(args, work)}
    # On a GPU one part at a time, so that no run shares the GPU; the rehearsal two at a time.
    with ThreadPoolExecutor(max_workers=2 if args.rehearse else 1) as pool:
        running = {pool.submit(timed_part, parts[name]): name for name in FIELDS if name in args.parts}
        for done in as_completed(running):
            results[running[done]] = done.result()
            results["seconds"] = round(time.perf_counter() - began, 1)
            with open(args.out, "w") as f:  # after every part: a run cut short keeps what it measured
                json.dump(results | {name: {"skipped": "not in --parts"} for name in FIELDS if name not in args.parts},
                          f, indent=1)
    print(args.out)


def timed_part(part):
    """A part's result, with the seconds it took; an exception is recorded, and the other parts still run."""
    started = time.perf_counter()
    try:
        result = part()
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    return result | {"part_seconds": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    main()
