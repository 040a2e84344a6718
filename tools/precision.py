"""How much of a fine-tune survives each sampling precision. Figures for BENCHMARKS.md.

    python -m tools.precision growth --base B --steps 12 --out /tmp/delta.safetensors
    python -m tools.precision survival --base B --delta /tmp/delta.safetensors --rms 3e-5 1e-4 3e-4
    python -m tools.precision survival --base B --rms 3e-5 1e-4 3e-4      # a random direction

SINE fine-tunes at lr 1e-6, so the fine-tuned weights differ from the base's by little. Sampling
in bf16 or fp16 rounds every weight; a difference much below the rounding step of the weight it
is added to is lost, and then the fine-tuned model guides as if it were the base.

growth: real training steps (sine.step_loss, AdamW at --lr, train.py's set-up) on --base,
printing after each step how far the weights have moved (RMS of w_ft - w_base) and which share of
the differences bf16 and fp16 weights still see. Writes the last difference (fp32) to --out.

survival: the fine-tuned model's own change, eps_ft(z, c) - eps_base(z, c), on noisy latents at
several t, with the difference of --delta scaled to each --rms. Each precision computes it the
way edit.py samples (Linear and Conv weights stored in that dtype, autocast around the UNet), and
is compared with fp32's: cosine and norm ratio. One JSON line per precision and size.
"""
import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(HERE, "examples", "cat.png")
PROMPT = "a photo of a [*] cat"


def trainable(sd):
    import sine
    return {f"{part}.{name}": p for part, module in sine.trainable_parts(sd).items()
            for name, p in module.named_parameters()}


def kept_share(base, delta, dtype):
    """How many nonzero differences weights rounded to dtype still see, round(w + d) != round(w), of how many."""
    moved = delta != 0
    return ((base + delta).to(dtype) != base.to(dtype))[moved].sum().item(), moved.sum().item()


def movement(params, start):
    """How far the weights have moved from start: RMS, and the share that bf16 and fp16 weights keep."""
    total_sq, count, kept = 0.0, 0, {torch.bfloat16: [0, 0], torch.float16: [0, 0]}
    for name, p in params.items():
        delta = p.detach() - start[name]
        total_sq += delta.double().square().sum().item()
        count += delta.numel()
        for dtype, tally in kept.items():
            seen, moved = kept_share(start[name], delta, dtype)
            tally[0] += seen
            tally[1] += moved
    return {"rms_delta": (total_sq / count) ** 0.5,
            **{f"{str(d).split('.')[1]}_kept": s / max(m, 1) for d, (s, m) in kept.items()}}


def fine_tune(sd, steps, lr=1e-6, batch=1, after_step=None):
    """Real SINE steps on examples/cat.png (AdamW during backward, as train.py does for SD v1); the
    trainable weights move in place. after_step(step, loss) is called after each."""
    import cli
    import sine
    import adamw
    from model.schedule import alphas_cumprod
    for module in sine.trainable_parts(sd).values():
        module.train().requires_grad_(True)
    params = trainable(sd)
    adamw.InBackward(list(params.values()), lr, fused=True)
    sd.unet.gradient_checkpointing = 4 * sum(p.numel() for p in params.values()) > 256 * 2**20
    sizes = sine.sizes_for(sd.config)
    canvas = sine.make_canvas(cli.load_image(PHOTO), sizes)
    ids = sd.tokenizer([sine.training_prompt(PROMPT)])
    full_map = sine.position_map(sd.config.unet.model_channels, sizes=sizes)
    generator, alphas = torch.Generator().manual_seed(0), alphas_cumprod()
    for step in range(1, steps + 1):
        loss, _ = sine.step_loss(sd, canvas, ids, True, generator, alphas, full_map, sizes=sizes, batch=batch)
        loss.backward()  # adamw.InBackward updates every weight in here
        loss = loss.item()
        cli.return_freed_memory()
        if after_step:
            after_step(step, loss)
    for module in sine.trainable_parts(sd).values():
        module.eval().requires_grad_(False)


def growth(args):
    from model import load_sd
    sd = load_sd(args.base)
    params = trainable(sd)
    start = {name: p.detach().clone() for name, p in params.items()}
    record, began = set(args.record or range(1, args.steps + 1)), [time.perf_counter()]

    def after_step(step, loss):
        if step in record:
            print(json.dumps({"step": step, "loss": round(loss, 5), "s": round(time.perf_counter() - began[0], 2),
                              **movement(params, start)}), flush=True)
        began[0] = time.perf_counter()

    fine_tune(sd, args.steps, args.lr, args.batch, after_step)
    save_file({name: (p.detach() - start[name]).contiguous() for name, p in params.items()}, args.out)


def noisy_inputs(sd, ts=(100, 400, 700, 950), latent=32):
    """(z_t, t, c_hat, position map): a batch of noisy latents, one per t, with the training prompt."""
    import sine
    from model.schedule import add_noise, alphas_cumprod
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(ts)
    z0 = torch.randn((len(ts), 4, latent, latent), generator=g)
    z = add_noise(z0, torch.randn(z0.shape, generator=g), t, alphas_cumprod())
    with torch.no_grad():
        context = sd.text_encoder(sd.tokenizer([sine.training_prompt(PROMPT)])).expand(len(ts), -1, -1)
    position = sine.full_position_map(sd.config.unet.model_channels, (latent, latent),
                                      sizes=sine.sizes_for(sd.config)).expand(len(ts), -1, -1, -1)
    return z, t, context, position


def noise_prediction(unet, dtype, inputs, outer=None, device="cpu"):
    """One pass the way edit.py samples a UNet whose Linear and Conv weights are in dtype: under its
    own autocast (cli.InPrecision), inside the pre-trained UNet's region `outer` as sine.edit calls it."""
    import cli
    device = torch.device(device)
    inputs = [x.to(device) for x in inputs]
    with torch.no_grad(), outer or torch.autocast(device.type, enabled=False):
        return cli.InPrecision(unet.to(device), device, dtype)(*inputs).float().cpu()


def compare(change, exact):
    """The fine-tuned model's own change in some precision against fp32's: cosine and norm ratio."""
    return {"cosine": F.cosine_similarity(change.flatten(), exact.flatten(), dim=0).item(),
            "norm_ratio": (change.norm() / exact.norm()).item()}


def low_precision_copy(unet, dtype):
    import cli
    unet = copy.deepcopy(unet)
    return unet if dtype == torch.float32 else cli.speed_up(unet, weights_dtype=dtype)


def emulated_copy(unet, dtype):
    """A copy that computes in fp32 what autocast to dtype computes on a GPU: every Linear and Conv
    with weights, inputs and outputs rounded to dtype, accumulating in fp32 (attention's own matmuls
    and the norms stay fp32). A CPU computes fp16 up to 150 times slower than fp32, so fp16 is measured so."""
    unet = copy.deepcopy(unet)
    rounded = lambda x: x.to(dtype).float()
    for layer in unet.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            with torch.no_grad():
                for p in layer.parameters():
                    p.copy_(rounded(p))
            layer.register_forward_pre_hook(lambda layer, inputs: tuple(rounded(x) for x in inputs))
            layer.register_forward_hook(lambda layer, inputs, output: rounded(output))
    return unet


# name: (how the UNet is prepared, the autocast dtype it runs under)
PATHS = {"fp32": (low_precision_copy, torch.float32), "bf16": (low_precision_copy, torch.bfloat16),
         "bf16 emulated": (lambda unet, d: emulated_copy(unet, torch.bfloat16), torch.float32),
         "fp16 emulated": (lambda unet, d: emulated_copy(unet, torch.float16), torch.float32)}


def survival(args):
    from model import load_sd
    sd = load_sd(args.base)
    params = trainable(sd)
    if args.delta:
        delta = load_file(args.delta)
    else:  # incoherent: a random direction
        g = torch.Generator().manual_seed(0)
        delta = {name: torch.randn(p.shape, generator=g) for name, p in params.items() if name.startswith("unet.")}
    delta = {name: d for name, d in delta.items() if name.startswith("unet.")}
    direction_rms = (sum(d.double().square().sum().item() for d in delta.values()) /
                     sum(d.numel() for d in delta.values())) ** 0.5
    inputs = noisy_inputs(sd, args.t, args.latent)
    paths = {name: path for name, path in PATHS.items() if name in args.paths}
    eps_base = {name: noise_prediction(prepare(sd.unet, d), d, inputs) for name, (prepare, d) in paths.items()}
    original = {name: params[name].detach().clone() for name in delta}
    for rms in args.rms:
        with torch.no_grad():
            for name, w in original.items():
                params[name].copy_(w + delta[name] * (rms / direction_rms))
        change = {}
        for name, (prepare, d) in paths.items():
            began = time.perf_counter()
            change[name] = noise_prediction(prepare(sd.unet, d), d, inputs) - eps_base[name]
            per_t = F.cosine_similarity(change[name].flatten(1), change["fp32"].flatten(1), dim=1)
            print(json.dumps({
                "direction": "file" if args.delta else "random", "rms_delta": rms, "precision": name,
                **compare(change[name], change["fp32"]),
                "cosine_per_t": {int(t): round(c.item(), 4) for t, c in zip(inputs[1], per_t)},
                "change_vs_eps": (change["fp32"].norm() / eps_base["fp32"].norm()).item(),
                "s": round(time.perf_counter() - began, 1)}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("growth")
    g.add_argument("--base", required=True)
    g.add_argument("--steps", type=int, default=12)
    g.add_argument("--record", type=int, nargs="*", help="steps after which to print (default: every step)")
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--out", required=True)
    s = sub.add_parser("survival")
    s.add_argument("--base", required=True)
    s.add_argument("--delta", help="a difference file from growth, whose direction is kept (default: a random one)")
    s.add_argument("--paths", nargs="+", default=list(PATHS), help="which precisions (fp32 first)")
    s.add_argument("--rms", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    s.add_argument("--t", type=int, nargs="+", default=[100, 400, 700, 950])
    s.add_argument("--latent", type=int, default=16, help="latent side (16: a 128 x 128 image)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    growth(args) if args.command == "growth" else survival(args)


if __name__ == "__main__":
    main()
