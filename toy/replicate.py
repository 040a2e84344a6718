"""The paper's experiments at toy scale, through the real train.py and edit.py, scored.

    python -m toy.replicate                  # seed 1: 4-8 minutes a seed on 2 cores of an Intel Xeon
    python -m toy.replicate --seed 2 3 4 5 6 --out replication

For each seed: draw a 2:1 scene ("a plain red circle on a white background", 128 x 64 pixels),
fine-tune the toy base on it with patches and with --no-patch, edit it to a striped shape, and
score every output (toy.score): `fidelity`, how much of the source's layout is kept, and `edit`,
how far the shape has gone towards the striped one. Then:

  1. arbitrary resolution (Sec. 3.3, Figs. 4-5): SINE at the source's 2:1 with the patch model
     keeps the shape where it was; with the --no-patch model, it duplicates or moves it.
  2. model-based guidance (Sec. 3.2, Fig. 6, tested as in Sec. 4.2): with the --no-patch model at
     its native 64 x 64, the fine-tuned model alone (Eq. 2), asked for the edit, keeps the layout
     and ignores the edit; the pre-trained model alone makes the edit and loses the layout; SINE
     (Eq. 3) keeps the layout and makes the edit.
  3. the K and v sweeps (Figs. 7-9): fidelity falls and edit rises as K or v grows.

It writes each seed's outputs and labelled grids under --out, results.json (one record per
output: its settings, fidelity and edit), and prints the table.
"""
import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

import outputs
import sine
from model import LATENT_SCALE, load_sd
from model.schedule import alphas_cumprod
from pictures import grid_image, to_pil

from . import score, world
from .base import TOY_BASE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEIGHT = 2 * world.SIZE, world.SIZE  # the 2:1 source, and the outputs at its size
WIDE, NATIVE = (WIDTH, HEIGHT), (world.SIZE, world.SIZE)  # (width, height): effects 1 and 3, effect 2
# The paper's sweeps reach the end where only the pre-trained model samples: K = 1000, v = 1 (Figs.
# 7 and 9). Not the other end, v near 0: there, it reports, the fine-tuned model's artifacts make
# fidelity poor (Sec. 4.3), and the toy's outputs mostly lose the shape. 0.5 is the lowest v the
# paper edits with (Fig. 19).
K_SWEEP = (0, 200, 400, 600, 800, 1000)
# Learning rates (every weight, LoRA adapters), measured on the toy: see toy/notes.md and
# toy/README.md's LoRA section.
PATCH_LR = (4e-4, 3e-3)
LR = (2e-4, 3e-3)
V_SWEEP = (0.5, 0.7, 0.9, 1.0)
K_EDIT, V_EDIT = sine.Guide.K, sine.Guide.v  # edit.py's defaults, which effects 1 and 2 use


def run(script, *args, threads=None):
    """Run train.py, edit.py or export.py as a user would; return the paths it printed."""
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"error: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    for line in result.stderr.replace("\r", "\n").splitlines():  # e.g. train.py's warning of a blown-up loss
        if line.startswith("warning:"):
            print(f"{script}: {line}", file=sys.stderr)
    return result.stdout.split()


def source_and_target(seed):
    """The seed's scene, plain, and the same scene striped: the edit's goal."""
    scene = world.random_scene(random.Random(seed), pattern="plain")
    return scene, dataclasses.replace(scene, pattern="striped")


def prompt(scene, identifier=False):
    """The scene's caption; with the identifier in the shape's place if asked.

    The identifier replaces the shape's word rather than joining it ("a plain red [*] circle ..."):
    the toy text encoder, trained on one caption template, reads words by their place, and an extra
    word shifts the background's word to where it reads nothing (measured on an earlier toy base:
    "a purple sks circle on a red background" drew a green background)."""
    return scene.caption().replace(f" {scene.shape} ", " [*] ") if identifier else scene.caption()


def sample(args, folder, size, *flags, threads=None, n=None):
    """edit.py's PNGs (not its grid): n seeds (default args.samples) at size (width, height)."""
    n = args.samples if n is None else n
    printed = run("edit.py", "--steps", args.ddim_steps, "--width", size[0], "--height", size[1], "--n", n,
                  "--seed", 0, "--out", os.path.join(folder, "edits"), "--no-bf16", *flags, threads=threads)
    return [p for p in printed if not p.endswith("-grid.png")]


def experiments(args, seed, scene, target, folder):
    """Fine-tune the three models and make every edit of the three experiments: {condition: [PNG paths]}.

    Effect 1: a patch model and a --no-patch model, both on the 2:1 source, each guiding SINE at 2:1.
    Effect 2 follows the paper's own test of it (Sec. 4.2, Fig. 6): one model fine-tuned without
    patches (800 steps there) on the scene at the base's native 64 x 64, sampled by itself with Eq. 2
    ("w/o guidance") and guiding the pre-trained model with Eq. 3 ("w/ guidance"). By itself means as
    an ordinary text-to-image model, its own unconditional prediction included: export.py writes it
    as a complete checkpoint. Effect 3 sweeps the patch model's K and v at 2:1.

    The patch model's steps take longest: it trains on one core while the other trains the two
    --no-patch models and makes their edits; with the sweeps, the patch model's edits are then split
    over both cores.
    (A toy step is too small to keep two cores busy: measured, 0.28 s a step on one thread, 0.30 s on
    two.)
    No gradient checkpointing: the toy fits in memory, and recomputing activations would only cost
    time (a quarter of a step; the weights come out the same)."""
    sources = {size: os.path.join(folder, f"source-{size[0]}x{size[1]}.png") for size in (WIDE, NATIVE)}
    for size, path in sources.items():
        world.draw(scene, *size).save(path)
    one_core = max(1, os.cpu_count() // 2)

    def train(name, size, *flags):
        return run("train.py", sources[size], prompt(scene, identifier=True), "--base", args.base,
                   "--seed", seed, "--out", os.path.join(folder, f"{name}.safetensors"), "--overwrite", "--no-keep-state",
                   "--no-grad-checkpointing", "--lora", args.lora, *flags, threads=one_core)[-1]

    base, asked = ["--base", args.base], ["--target", prompt(target)]
    with ThreadPoolExecutor(1) as pool:
        patch_model = pool.submit(train, "patch", WIDE, "--steps", args.steps, "--batch", args.batch,
                                  "--lr", args.patch_lr)
        no_patch = train("no-patch", WIDE, "--no-patch", "--steps", args.nopatch_steps, "--lr", args.lr)
        guidance = train("guidance-test", NATIVE, "--no-patch", "--steps", args.guidance_steps, "--lr", args.lr)
        exported = run("export.py", guidance, *base, "--fp32", "--overwrite",
                       "--out", os.path.join(folder, "guidance-test-exported.safetensors"), threads=one_core)[-1]
        found = {
            "SINE, --no-patch model": sample(args, folder, WIDE, *base, *asked, "--finetuned", no_patch, threads=one_core),
            "fine-tuned model alone": sample(args, folder, NATIVE, "--base", exported, "--finetuned", "none", "--target",
                                             sine.training_prompt(prompt(target, identifier=True)), threads=one_core),
            "pre-trained model alone": sample(args, folder, NATIVE, *base, *asked, "--finetuned", "none", threads=one_core),
            "SINE at 1:1": sample(args, folder, NATIVE, *base, *asked, "--finetuned", guidance, threads=one_core),
        }
        patch = [*base, *asked, "--finetuned", patch_model.result()]  # the patch model's edits' flags
    if not args.sweeps:
        found["SINE, patch model"] = sample(args, folder, WIDE, *patch)
        return found
    # Its edits, split over the cores: two processes, each with half of them and half the cores, make
    # them 1.5-1.7 times as fast as one with all (a toy sample keeps two threads only partly busy).
    n = min(args.sweep_samples, args.samples)
    with ThreadPoolExecutor(1) as pool:
        K_sweep = pool.submit(sample, args, folder, WIDE, *patch, "--K", ",".join(str(K) for K in K_SWEEP if K != K_EDIT),
                              threads=one_core, n=n)
        found["SINE, patch model"] = sample(args, folder, WIDE, *patch, threads=one_core)
        v_sweep = sample(args, folder, WIDE, *patch, "--v", ",".join(str(v) for v in V_SWEEP if v != V_EDIT),
                         threads=one_core, n=n)
    # Each sweep passes through edit.py's defaults, K = 400 at v = 0.7: effect 1's setting. Those edits
    # are the same images (edit.py's PNGs come in seed order), so the sweeps reuse the first n of them.
    again = found["SINE, patch model"][:n]
    found["K sweep"], found["v sweep"] = again + K_sweep.result(), again + v_sweep
    return found


class PerfectPatchModel(torch.nn.Module):
    """Effect 1's yardstick: a guide that knows the source's latent z0 already and predicts the noise
    that leads back to it, eps = (z_t - sqrt(a_t) z0) / sqrt(1 - a_t). No training: in Eq. 3, at
    the same K and v, it does what the best patch model could."""

    def __init__(self, z0):
        super().__init__()
        self.z0, self.alphas = z0, alphas_cumprod()

    def forward(self, z, t, context=None, position=None):
        a = self.alphas[t].view(-1, 1, 1, 1)
        return (z - a.sqrt() * self.z0) / (1 - a).sqrt()


@torch.no_grad()
def perfect_patch_model(args, folder, scene, target):
    """Effect 1's edits with the perfect patch model in place of the real one, sampled in-process as
    edit.py samples (fp32, the same seeds and starting noise): one row each, as records() makes."""
    sd = load_sd(args.base)
    source, reference = world.draw(scene, *WIDE), world.draw(target, *WIDE)
    z0 = LATENT_SCALE * sd.vae.encode(sine.to_tensor(source, (HEIGHT, WIDTH)))[0]  # the mean: (1, 4, h, w)
    encode = lambda text: sd.text_encoder(sd.tokenizer([text]))
    guide = sine.Guide(PerfectPatchModel(z0), None, None, v=V_EDIT, K=K_EDIT)
    cond, uncond = encode(prompt(target)), encode("")
    os.makedirs(os.path.join(folder, "perfect"), exist_ok=True)
    rows = []
    for seed in range(args.samples):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(z0.shape, generator=generator)
        image = to_pil(sine.edit(sd, [guide], cond, uncond, noise, 7.5, args.ddim_steps, 0.0, generator, progress=False))
        path = os.path.join(folder, "perfect", f"seed{seed}.png")
        image.save(path)
        rows.append({"condition": PERFECT, "path": os.path.relpath(path, ROOT), "seed": seed, "K": float(K_EDIT),
                     "v": float(V_EDIT), "target": prompt(target), "fidelity": round(score.fidelity(image, source), 4),
                     "edit": round(score.edit(image, source, reference), 4),
                     "objects": score.components(score.object_mask(image))})
    return rows


PERFECT = "SINE, perfect patch model"


def records(found, scene, target):
    """One row per output, scored against the scene and the target drawn at the output's size: 2:1
    for effects 1 and 3, 1:1 for effect 2."""
    drawn = {size: (world.draw(scene, *size), world.draw(target, *size)) for size in (WIDE, NATIVE)}
    rows = []
    for condition, paths in found.items():
        for path in paths:
            settings = outputs.read_settings(path)
            image = Image.open(path).convert("RGB")
            source, reference = drawn[image.size]
            rows.append({"condition": condition, "path": os.path.relpath(path, ROOT), "seed": settings["seed"],
                         "K": float(settings["K"]), "v": float(settings["v"]), "target": settings["target"],
                         "fidelity": round(score.fidelity(image, source), 4),
                         "edit": round(score.edit(image, source, reference), 4),
                         "objects": score.components(score.object_mask(image))})
    return rows


def mean(rows, key, **where):
    values = [r[key] for r in rows if all(r[k] == v for k, v in where.items())]
    return float(np.mean(values))


def ranks(values):
    """Ranks from 0, ties sharing their mean rank (as Spearman's correlation needs: every sample of a
    setting has the same K)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(len(values))
    for value in np.unique(values):
        ranked[values == value] = ranked[values == value].mean()
    return ranked


def trend(rows, condition, knob):
    """Spearman's rank correlation of fidelity and of edit with K or v, over a sweep's outputs."""
    picked = [r for r in rows if r["condition"] == condition]
    knob_ranks = ranks([r[knob] for r in picked])
    corr = lambda key: float(np.corrcoef(knob_ranks, ranks([r[key] for r in picked]))[0, 1])
    return corr("fidelity"), corr("edit")


def effects(rows):
    """Each effect's numbers, and whether they show it."""
    c = lambda condition, key: mean(rows, key, condition=condition)
    patch, nopatch, guided = "SINE, patch model", "SINE, --no-patch model", "SINE at 1:1"
    alone, pre = "fine-tuned model alone", "pre-trained model alone"
    found = {
        "1: position map keeps the layout at 2:1": {
            "fidelity, patch": c(patch, "fidelity"), "fidelity, no-patch": c(nopatch, "fidelity"),
            "fidelity, perfect patch model": c(PERFECT, "fidelity"),
            "objects, patch": c(patch, "objects"), "objects, no-patch": c(nopatch, "objects"),
            "shows": c(patch, "fidelity") > c(nopatch, "fidelity")},
        "2: model-based guidance": {
            "edit, fine-tuned alone": c(alone, "edit"), "fidelity, pre-trained alone": c(pre, "fidelity"),
            "fidelity, SINE": c(guided, "fidelity"), "edit, SINE": c(guided, "edit"),
            "shows": c(guided, "edit") > c(alone, "edit") and c(guided, "fidelity") > c(pre, "fidelity")},
    }
    if any(r["condition"] == "K sweep" for r in rows):
        K_fid, K_edit = trend(rows, "K sweep", "K")
        v_fid, v_edit = trend(rows, "v sweep", "v")
        found["3: K and v sweeps"] = {
            "fidelity ~ K": K_fid, "edit ~ K": K_edit, "fidelity ~ v": v_fid, "edit ~ v": v_edit,
            "shows": K_fid < 0 < K_edit and v_fid < 0 < v_edit}
    return found


def labelled_grid(source, rows, conditions, path, zoom=2):
    """The source, then one column per condition, one row per sample seed; labels on each cell."""
    big = lambda image: image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    seeds = sorted({r["seed"] for r in rows if r["condition"] in {condition for condition, _ in conditions}})
    cells = {(i, 0): (big(source), "source") for i in range(len(seeds))}
    for col, (condition, where) in enumerate(conditions, start=1):
        for i, seed in enumerate(seeds):
            row = next(r for r in rows if r["condition"] == condition and r["seed"] == seed and
                       all(r[k] == v for k, v in where.items()))
            cells[i, col] = (big(Image.open(os.path.join(ROOT, row["path"])).convert("RGB")),
                             f"{condition.replace('SINE, ', '')}{' ' if where else ''}"
                             f"{' '.join(f'{k}={v:g}' for k, v in where.items())}")
    grid_image(cells, len(seeds), len(conditions) + 1).save(path)
    return path


def replicate(args, seed):
    folder = os.path.join(args.out, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    scene, target = source_and_target(seed)
    print(f"seed {seed}: {scene.caption()} -> {target.pattern}", flush=True)
    rows = records(experiments(args, seed, scene, target, folder), scene, target)
    rows += perfect_patch_model(args, folder, scene, target)
    source, native = world.draw(scene, WIDTH, HEIGHT), world.draw(scene)
    labelled_grid(source, rows, [("SINE, patch model", {}), ("SINE, --no-patch model", {}), (PERFECT, {})],
                  os.path.join(folder, "effect1.png"))
    labelled_grid(native, rows, [("fine-tuned model alone", {}), ("pre-trained model alone", {}), ("SINE at 1:1", {})],
                  os.path.join(folder, "effect2.png"))
    if args.sweeps:
        labelled_grid(source, rows, [("K sweep", {"K": K}) for K in K_SWEEP], os.path.join(folder, "sweep-K.png"))
        labelled_grid(source, rows, [("v sweep", {"v": v}) for v in V_SWEEP], os.path.join(folder, "sweep-v.png"))
    return {"seed": seed, "source": scene.caption(), "target": prompt(target), "outputs": rows,
            "effects": effects(rows)}


def table(results):
    lines = ["| seed | source -> target | 1: fidelity patch / no-patch / perfect | 2: edit ft alone / SINE, "
             "fidelity pre-trained alone / SINE | 3: fidelity ~ K, edit ~ K, fidelity ~ v, edit ~ v | shown |",
             "|---|---|---|---|---|---|"]
    for r in results:
        e1, e2, e3 = list(r["effects"].values()) + [None] * (3 - len(r["effects"]))
        shown = " ".join(name[0] for name, e in r["effects"].items() if e["shows"]) or "none"
        sweeps = (f"{e3['fidelity ~ K']:+.2f}, {e3['edit ~ K']:+.2f}, {e3['fidelity ~ v']:+.2f}, "
                  f"{e3['edit ~ v']:+.2f}" if e3 else "not run")
        lines.append(f"| {r['seed']} | {r['source'].split(' on ')[0][2:]} -> {r['target'].split()[1]} | "
                     f"{e1['fidelity, patch']:.2f} / {e1['fidelity, no-patch']:.2f} / "
                     f"{e1['fidelity, perfect patch model']:.2f} | "
                     f"{e2['edit, fine-tuned alone']:.2f} / {e2['edit, SINE']:.2f}, "
                     f"{e2['fidelity, pre-trained alone']:.2f} / {e2['fidelity, SINE']:.2f} | "
                     f"{sweeps} | {shown} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="SINE's experiments on the toy base, scored.")
    p.add_argument("--seed", type=int, nargs="+", default=[1], help="one replication per seed")
    p.add_argument("--out", default="replication")
    p.add_argument("--base", default=TOY_BASE)
    p.add_argument("--steps", type=int, default=1000, help="fine-tuning steps with patches (train.py --steps)")
    p.add_argument("--batch", type=int, default=4, help="crops a step with patches (train.py --batch; the paper's 1)")
    p.add_argument("--patch-lr", type=float, help=f"learning rate with patches (default {PATCH_LR[0]:g}; with --lora "
                                                  f"{PATCH_LR[1]:g})")
    p.add_argument("--nopatch-steps", type=int, default=200, help="fine-tuning steps with --no-patch (effect 1)")
    p.add_argument("--guidance-steps", type=int, default=800,
                   help="fine-tuning steps of effect 2's --no-patch model at 1:1 (the paper's 800, Sec. 4.2)")
    p.add_argument("--lr", type=float, help=f"learning rate with --no-patch (default {LR[0]:g}; with --lora "
                                            f"{LR[1]:g}; the paper's 1e-6 is for SD v1)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="fine-tune every model through train.py --lora RANK (0: every weight, the paper's)")
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--samples", type=int, default=8, help="edits per setting of effects 1 and 2, with seeds 0, 1, ...")
    p.add_argument("--sweep-samples", type=int, default=5,
                   help="edits per setting of the K and v sweeps, seeds 0, 1, ... (no more than --samples)")
    p.add_argument("--sweeps", action=argparse.BooleanOptionalAction, default=True,
                   help="the K and v sweeps of effect 3 (--no-sweeps: effects 1 and 2 only)")
    args = p.parse_args(argv)
    args.patch_lr = args.patch_lr or PATCH_LR[args.lora > 0]
    args.lr = args.lr or LR[args.lora > 0]
    if not os.path.isfile(args.base):
        sys.exit(f"error: {args.base} is missing: it is committed with the project, or made by python -m toy.pretrain")
    start = time.time()
    results = [replicate(args, seed) for seed in args.seed]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results},
                  f, indent=1)
    print(table(results))
    print(f"{os.path.join(args.out, 'results.json')}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
