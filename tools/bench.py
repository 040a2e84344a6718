"""Speed and memory: sine against diffusers, on the same random full-size SD v1 weights.

    python -m tools.bench --quick            # CPU: under 15 minutes (a 256x256, 10-step edit)
    python -m tools.bench                    # the full sizes: a 512x512 edit with 50 steps
    python -m tools.bench --only unet,load   # some of the benchmarks

Four benchmarks, each timed for our code and for the same work written with diffusers' modules:

  unet   one UNet forward, batch 2, 64x64 latents: the batch of every DDIM step of an edit
  edit   a whole SINE edit (prompts, DDIM with model-based guidance, K=400, v=0.7, VAE decode)
  train  one fine-tuning step: batch 1, a 512x512 crop, UNet and text encoder trainable, AdamW
         (and `trainpy`: train.py itself for two steps, for the whole process's peak memory),
         also as train.py --lora 8 trains: rank-8 adapters on frozen weights
  load   an fp16 checkpoint loaded into fp32 modules

plus `vae`: the tiled VAE decode against the untiled one (time, peak memory, drift), and with
--big the peak memory of a 2048x2048 edit (slow on a CPU).

Every measurement is a separate process (`python -m tools.bench --worker ...`), run one after another,
so that its peak memory is its own and two full-size models never share the machine. Times are
medians of several runs after a warm-up run; peak memory is the process's peak resident set (RSS)
during the timed runs (for `load`: during loading), and on CUDA also the peak of allocated GPU memory.
The checkpoints (fp32, fp16 and a fine-tuned difference file, 8.5 GB together) are random, written
into a temporary folder and deleted at the end (--keep DIR keeps them for the next run).

diffusers is imported here and in the tests only, never by sine itself.
"""
import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
FP32_MODEL_GB = 1.066e9 * 4 / 1e9  # UNet + VAE + text encoder in fp32: 4.26 GB
UNET_TFLOP_512 = 0.80               # one UNet forward, batch 1, 64x64 latents (the floor)
PROMPT = "a photo of a [*] castle"  # the fine-tuned model's training prompt
TARGET = "a photo of a castle covered by snow"
K, V, SCALE = 400, 0.7, 7.5


@dataclass
class Job:
    bench: str                  # unet, edit, train, trainpy, load, vae, big
    side: str                   # ours or diffusers
    device: str
    repeats: int = 3
    warmup: int = 1
    bf16: bool = False
    fp16: bool = False          # a GPU's: a CPU computes fp16 up to 150 times slower than fp32
    channels_last: bool = False
    compile: bool = False
    sdpa: bool = True
    grad_checkpointing: bool = False
    adamw_after_backward: bool = False  # the old training step: every gradient kept until optimizer.step()
    lora: int = 0               # train and trainpy: the rank of train.py --lora (0: every weight learns)
    tiled: bool = False
    tiny: bool = False          # the tiny test model instead of SD v1 size: checks bench.py itself
    size: int = 512             # image side in pixels (edit, vae, big)
    steps: int = 50
    files: dict = field(default_factory=dict)

    @property
    def half(self):
        """The UNets' dtype under autocast, None for fp32."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None

    @property
    def name(self):
        switches = [s for s, on in (("bf16", self.bf16), ("fp16", self.fp16), ("channels_last", self.channels_last),
                                    ("compile", self.compile), ("no-sdpa", not self.sdpa),
                                    ("grad-ckpt", self.grad_checkpointing), ("tiled", self.tiled),
                                    ("adamw-after-backward", self.adamw_after_backward),
                                    (f"lora{self.lora}", self.lora)) if on]
        return f"{self.bench}/{self.side}/" + ("+".join(switches) or "fp32")


# =============================================================================================
# Measuring, inside a worker

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peaks(device):
    """Start a new peak: Linux resets the process's peak RSS (VmHWM) when 5 is written to clear_refs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak is then the whole process's


def rss_gb(field_name="VmHWM"):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def peaks(device):
    result = {"peak_rss_gb": rss_gb("VmHWM")}
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["peak_cuda_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9  # what the card must hold
    return result


def timed(fn, job, device):
    """fn() after job.warmup untimed calls, job.repeats times: (last output, times, peak memory)."""
    out = None
    for _ in range(job.warmup):
        out = fn()
    sync(device)
    reset_peaks(device)
    times, usage_before = [], cpu_usage()
    for _ in range(job.repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    usage = {k: (v - usage_before[k]) / job.repeats for k, v in cpu_usage().items()}
    return out, times, {**peaks(device), **usage}


def cpu_usage():
    """Minor page faults and system CPU seconds so far: a new buffer's pages each fault once when
    first touched, and the kernel's time zeroing them shows as system time."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": usage.ru_minflt, "sys_s": usage.ru_stime}


ADAMW_TIMES = []  # a worker runs one job: its optimizer steps' durations


def time_optimizer(optimizer, device, log):
    """Record how long each optimizer.step() takes: the fp32 AdamW update bounds a training step."""
    step = optimizer.step

    def timed_step(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = step(*args, **kwargs)
        sync(device)
        log.append(time.perf_counter() - start)
        return out

    optimizer.step = timed_step
    return optimizer


def save_output(job, name, tensor):
    from safetensors.torch import save_file
    path = os.path.join(job.files["dir"], f"out-{job.name.replace('/', '_')}-{name}.safetensors")
    save_file({"x": tensor.detach().float().cpu().contiguous()}, path)
    return path


def autocast(job, device):
    return torch.autocast(device.type, dtype=job.half or torch.bfloat16, enabled=job.half is not None)


def sd_config(tiny):
    from model import SDConfig
    from model.tiny import TINY
    return TINY if tiny else SDConfig()


# =============================================================================================
# Our side: the code that edit.py and train.py run

def ours_load(job, device, finetuned=False):
    import cli
    import finetuned_file
    from model import load_sd
    cli.use_huge_pages()  # as train.py and edit.py do before loading
    sd = load_sd(job.files["fp32"], device=device)
    if finetuned:
        finetuned_file.apply_finetuned(sd, job.files["finetuned"])
    return sd


def ours_unet(job, device):
    import cli
    import model.attention
    sd = ours_load(job, device)
    unet = cli.speed_up(sd.unet, job.channels_last, job.compile, weights_dtype=job.half)
    del sd
    model.attention.USE_SDPA = job.sdpa
    x, t, context = unet_inputs(job, device)
    return lambda: unet(x, t, context)


def ours_edit(job, device):
    """What edit.py's main does for one image, minus argument checks and the PNG."""
    import cli
    import model.attention
    import sine
    sd, ft = ours_load(job, device), ours_load(job, device, finetuned=True)
    for loaded in (sd, ft):
        cli.speed_up(loaded.unet, job.channels_last, job.compile, weights_dtype=job.half)
    model.attention.USE_SDPA = job.sdpa
    region = autocast(job, device)
    latent = (job.size // 8, job.size // 8)

    @torch.no_grad()
    def run():
        encode = lambda m, prompt: m.text_encoder(m.tokenizer([prompt]).to(device))
        cond, uncond = encode(sd, TARGET), encode(sd, "")
        guide = sine.Guide(ft.unet, encode(ft, sine.training_prompt(PROMPT)),
                           sine.full_position_map(ft.config.unet.model_channels, latent, device), v=V, K=K)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn((1, 4, *latent), generator=generator).to(device)
        return sine.edit(sd, [guide], cond, uncond, noise, SCALE, job.steps, 0.0, generator, progress=False,
                         autocast=region, tiled=job.tiled)

    return run


def ours_train(job, device):
    """What train.py's main does per step (patch mode). With job.adamw_after_backward, SD v1's step as
    it was before AdamW moved into backward: one AdamW over all parameters once every gradient is in."""
    import adamw
    import cli
    import sine
    from model import lora
    sd = ours_load(job, device)
    params = [p for module in sine.trainable_parts(sd).values() for p in module.train().requires_grad_(True).parameters()]
    if job.lora:  # as train.py --lora: the base frozen, adapters learn
        params = lora.adapt(sd, job.lora, generator=torch.Generator())
    sd.unet.gradient_checkpointing = job.grad_checkpointing
    if job.adamw_after_backward:
        optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01, fused=device.type == "cuda")
        time_optimizer(optimizer, device, ADAMW_TIMES)
    else:  # as train.py: AdamW after backward for small ones (LoRA's adapters) or where a GPU has room, else in it
        optimizer, _ = adamw.make_optimizer(params, 1e-4 if job.lora else 1e-6, adamw.room_for_gradients(device, params))
    cli.speed_up(sd.unet, compile=job.compile)
    canvas, ids, full_map, alphas, generator = train_inputs(job, sd.tokenizer, device)
    region = cli.bf16_autocast(device, job.bf16)

    def step():
        loss, _ = sine.step_loss(sd, canvas, ids, True, generator, alphas, full_map, region)
        loss.backward()  # as train.py's loop
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cpu":
            cli.return_freed_memory()  # as train.py
        return loss.item()

    return step


def ours_loading(job, device):
    import cli
    from model import load_sd
    cli.use_huge_pages()
    return load_sd(job.files["fp16"], device=device, dtype=torch.float32)


# =============================================================================================
# The diffusers side: the same work with diffusers' (and transformers') modules

def diffusers_models(job, device, finetuned=False, parts=("unet", "vae", "text"), unet_dtype=None):
    """Our checkpoint file through diffusers' own single-file loader, configured for SD v1.
    unet_dtype: the UNet's weights in bf16 or fp16, as diffusers users sample with torch_dtype=..."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    state = load_file(job.files["fp32"])
    if finetuned:
        with safe_open(job.files["finetuned"], framework="pt") as f:
            for key in f.keys():
                state[key] = state[key] + f.get_tensor(key).float()
    models = {}
    kwargs = dict(config=job.files["diffusers_config"], torch_dtype=torch.float32, local_files_only=True)
    if "unet" in parts:
        models["unet"] = UNet2DConditionModel.from_single_file(state, subfolder="unet", **kwargs).to(device)
    if "vae" in parts:
        models["vae"] = AutoencoderKL.from_single_file(state, subfolder="vae", **kwargs).to(device)
    if "text" in parts:
        models["text"] = diffusers_text_encoder(job, state).to(device)
    del state
    gc.collect()
    for m in models.values():
        m.eval().requires_grad_(False)
    if unet_dtype and "unet" in models:
        models["unet"].to(unet_dtype)
    if job.channels_last and "unet" in models:
        models["unet"].to(memory_format=torch.channels_last)
    if job.compile and "unet" in models:
        models["unet"].compile()
    return models


def diffusers_text_encoder(job, state):
    """transformers' CLIPTextModel, filled from the checkpoint's cond_stage_model.* tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.loader import PREFIXES
    cfg = sd_config(job.tiny).text_encoder
    config = CLIPTextConfig(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions, hidden_size=cfg.width,
                            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407)
    with torch.device("meta"):
        text = CLIPTextModel(config)
    prefix = PREFIXES["text_encoder"]  # transformers 5 names the keys without "text_model."
    add = "text_model." if any(k.startswith("text_model.") for k in text.state_dict()) else ""
    weights = {add + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "position_ids" not in k}
    text.load_state_dict(weights, strict=True, assign=True)
    for name, buffer in list(text.named_buffers()):  # position_ids: not in the file, left on the meta device
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            text.get_submodule(owner).register_buffer(attr, torch.arange(cfg.max_positions)[None], persistent=False)
    return text


def add_position_map(unet):
    """SINE's map is added to the output of the first conv: a forward hook on diffusers' conv_in."""
    holder = {"pos": None}
    unet.conv_in.register_forward_hook(
        lambda m, i, out: out if holder["pos"] is None else out + holder["pos"].to(out.dtype))
    return holder


def diffusers_unet(job, device):
    unet = diffusers_models(job, device, parts=("unet",), unet_dtype=job.half)["unet"]
    x, t, context = unet_inputs(job, device)
    return lambda: unet(x, t, encoder_hidden_states=context).sample


def diffusers_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def diffusers_edit(job, device):
    """A diffusers-based sampling loop with SINE's guidance (Eq. 3 while t > K, else Eq. 2)."""
    import sine
    from model import Tokenizer
    base = diffusers_models(job, device, unet_dtype=job.half)
    ft = diffusers_models(job, device, finetuned=True, parts=("unet", "text"), unet_dtype=job.half)
    holder = add_position_map(ft["unet"])
    tokenizer = Tokenizer()  # the same ids on both sides; tokenizing is not what we time
    scheduler = diffusers_scheduler()
    latent = (job.size // 8, job.size // 8)

    @torch.no_grad()
    def run():
        encode = lambda text, prompt: text(tokenizer([prompt]).to(device)).last_hidden_state
        cond, uncond = encode(base["text"], TARGET), encode(base["text"], "")
        c_hat = encode(ft["text"], sine.training_prompt(PROMPT))
        holder["pos"] = sine.full_position_map(sd_config(job.tiny).unet.model_channels, latent, device)
        generator = torch.Generator().manual_seed(0)
        z = torch.randn((1, 4, *latent), generator=generator).to(device)
        scheduler.set_timesteps(job.steps)
        with autocast(job, device):
            for t in scheduler.timesteps:
                eps_cond, eps_uncond = base["unet"](torch.cat([z, z]), t, encoder_hidden_states=torch.cat([cond, uncond])
                                                    ).sample.float().chunk(2)
                if t > K:
                    eps_ft = ft["unet"](z, t, encoder_hidden_states=c_hat).sample.float()
                    eps_cond = V * eps_cond + (1 - V) * eps_ft
                z = scheduler.step(eps_uncond + SCALE * (eps_cond - eps_uncond), t, z).prev_sample
        if job.tiled:
            base["vae"].enable_tiling()
        return base["vae"].decode(z / 0.18215).sample.clamp(-1, 1)  # fp32, outside autocast, as ours

    return run


def diffusers_train(job, device):
    """The same step as train.py's (sine.step_loss and backward), with diffusers modules: same crops, noise, loss."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    import sine
    from model import Tokenizer
    models = diffusers_models(job, device)
    unet, vae, text = models["unet"], models["vae"], models["text"]
    for module in (unet, text):
        module.train().requires_grad_(True)
    if job.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01, fused=device.type == "cuda")
    time_optimizer(optimizer, device, ADAMW_TIMES)
    holder = add_position_map(unet)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear")
    alphas = noise_scheduler.alphas_cumprod.to(device)
    canvas, ids, full_map, _, generator = train_inputs(job, Tokenizer(), device)

    def step():
        crop_box = sine.sample_crop_box(generator)
        with torch.no_grad():
            dist = vae.encode(sine.crop_pixels(canvas, crop_box).to(device)).latent_dist
            z0 = 0.18215 * (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(device))
        holder["pos"] = sine.crop_position_map(full_map, crop_box, z0.shape[-2:]).to(z0)
        t = torch.randint(0, 1000, (1,), generator=generator).to(device)
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        with autocast(job, device):
            context = text(ids).last_hidden_state
            z_t = noise_scheduler.add_noise(z0, noise, t)
            eps = unet(z_t, t, encoder_hidden_states=context).sample.float()
            loss = F.mse_loss(eps, noise)
            a = alphas[t].view(-1, 1, 1, 1)
            x0 = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
            recon = (x0 - z0).abs().mean(dim=(1, 2, 3))
            loss = loss + ((t.float() / 1000) ** 2 * recon).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def diffusers_loading(job, device):
    """diffusers' single-file loader on the fp16 file, to fp32 (the file is read once, for all three)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    state = load_file(job.files["fp16"])
    kwargs = dict(config=job.files["diffusers_config"], torch_dtype=torch.float32, local_files_only=True)
    models = (UNet2DConditionModel.from_single_file(state, subfolder="unet", **kwargs).to(device),
              AutoencoderKL.from_single_file(state, subfolder="vae", **kwargs).to(device),
              diffusers_text_encoder(job, {k: v.float() for k, v in state.items() if k.startswith("cond_stage_model.")}
                                     ).to(device))
    del state
    return models


# =============================================================================================
# Inputs shared by both sides (same seeds)

def unet_inputs(job, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    context = torch.randn(2, 77, sd_config(job.tiny).unet.context_dim, generator=g)
    return x.to(device), torch.tensor([501, 501], device=device), context.to(device)


def train_inputs(job, tokenizer, device):
    import numpy as np
    from PIL import Image

    import sine
    from model.schedule import alphas_cumprod
    pixels = np.random.default_rng(1).integers(0, 256, (sine.SD_V1.canvas, sine.SD_V1.canvas, 3), dtype=np.uint8)
    canvas = sine.make_canvas(Image.fromarray(pixels))
    ids = tokenizer([sine.training_prompt(PROMPT)]).to(device)
    full_map = sine.position_map(sd_config(job.tiny).unet.model_channels).to(device)
    return canvas, ids, full_map, alphas_cumprod().to(device), torch.Generator().manual_seed(0)


# =============================================================================================
# Workers: one measurement each, in a fresh process

def worker(job):
    device = torch.device(job.device)
    torch.manual_seed(0)
    result = {"job": job.name}
    if job.bench == "prepare":
        return prepare_files(job.files, job.tiny)
    if job.bench == "load":
        if job.files.get("warm"):
            with open(job.files["fp16"], "rb") as f:  # from the OS file cache, as on a second run
                while f.read(1 << 26):
                    pass
        result["rss_before_gb"] = rss_gb("VmRSS")
        reset_peaks(device)
        start = time.perf_counter()
        loaded = (ours_loading if job.side == "ours" else diffusers_loading)(job, device)
        sync(device)
        result["times"] = [time.perf_counter() - start]
        result.update(peaks(device))
        result["rss_after_gb"] = rss_gb("VmRSS")
        modules = (loaded.unet, loaded.vae, loaded.text_encoder) if job.side == "ours" else loaded
        result["params"] = sum(p.numel() for m in modules for p in m.parameters())
        return result
    if job.bench == "vae":
        return vae_worker(job, device, result)
    if job.bench == "trainpy":
        return trainpy_worker(job, result)
    if job.bench == "big":
        return big_worker(job, device, result)

    builders = {("unet", "ours"): ours_unet, ("unet", "diffusers"): diffusers_unet,
                ("edit", "ours"): ours_edit, ("edit", "diffusers"): diffusers_edit,
                ("train", "ours"): ours_train, ("train", "diffusers"): diffusers_train}
    start = time.perf_counter()
    fn = builders[job.bench, job.side](job, device)
    sync(device)
    result["setup_s"] = time.perf_counter() - start
    result["rss_loaded_gb"] = rss_gb("VmRSS")
    if job.bench == "unet":
        inner = fn

        def fn():
            with torch.no_grad(), autocast(job, device):
                return inner()
    if job.bench == "train":
        outputs = []
        inner = fn
        fn = lambda: outputs.append(inner()) or outputs[-1]
    out, result["times"], memory = timed(fn, job, device)
    result.update(memory)
    if job.bench == "train":
        result["losses"] = outputs
        result["adamw_s"] = ADAMW_TIMES[job.warmup:]
    else:
        result["output"] = save_output(job, "out", out)
    return result


def vae_worker(job, device, result):
    """Decode a random latent of job.size pixels, tiled or not (ours)."""
    sd = ours_load(job, device)
    vae = sd.vae
    del sd
    latents = torch.randn(1, 4, job.size // 8, job.size // 8, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        out, result["times"], memory = timed(lambda: vae.decode(latents, tiled=job.tiled), job, device)
    result.update(memory)
    result["output"] = save_output(job, "out", out)
    return result


def trainpy_worker(job, result):
    """train.py itself, two steps on the fp32 file: its process's peak RSS, loading and saving included."""
    import numpy as np
    from PIL import Image
    photo, out = os.path.join(job.files["dir"], "photo.png"), os.path.join(job.files["dir"], "trainpy.safetensors")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(photo)
    command = [sys.executable, os.path.join(HERE, "train.py"), photo, PROMPT, "--base", job.files["fp32"],
               "--steps", "2", "--out", out, "--overwrite", "--device", job.device,
               "--grad-checkpointing" if job.grad_checkpointing else "--no-grad-checkpointing",
               "--bf16" if job.bf16 else "--no-bf16", "--lora", str(job.lora)]
    start = time.perf_counter()
    with open(os.path.join(job.files["dir"], "trainpy.log"), "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise RuntimeError(f"train.py failed with status {status}: see {log.name}")
    result["times"] = [time.perf_counter() - start]
    result["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # Linux: kB
    return result


def big_worker(job, device, result):
    """The peak memory of a job.size x job.size edit: both models loaded, one guided DDIM step
    (a batch-2 base pass and a fine-tuned pass), then the VAE decode, tiled as edit.py does."""
    import cli
    import sine
    sd, ft = ours_load(job, device), ours_load(job, device, finetuned=True)
    for loaded in (sd, ft):
        cli.speed_up(loaded.unet, weights_dtype=torch.bfloat16 if job.bf16 else None)
    latent = (job.size // 8, job.size // 8)
    region = cli.bf16_autocast(device, job.bf16)
    with torch.no_grad():
        cond = uncond = sd.text_encoder(sd.tokenizer([""]).to(device))
        guide = sine.Guide(ft.unet, cond, sine.full_position_map(sd.config.unet.model_channels, latent, device), v=V, K=0)
        noise = torch.randn((1, 4, *latent), generator=torch.Generator().manual_seed(0)).to(device)
        run = lambda: sine.edit(sd, [guide], cond, uncond, noise, SCALE, 1, progress=False, autocast=region, tiled=None)
        _, result["times"], memory = timed(run, job, device)
    result.update(memory)
    return result


def prepare_files(files, tiny=False):
    """Random full-size checkpoints in the SD v1 layout (fp32 and fp16), a fine-tuned difference file
    as train.py writes it, and diffusers config folders for SD v1. Skips files that exist."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    from model.loader import CONFIG_KEY, PREFIXES, fingerprint
    from model.tiny import random_state_dict
    config = sd_config(tiny)
    if not (os.path.exists(files["fp32"]) and os.path.exists(files["fp16"])):
        state = random_state_dict(config, seed=0)
        # no config in the metadata means SD v1 size
        save_file(state, files["fp32"], metadata={CONFIG_KEY: config.to_json()} if tiny else None)
        for key in state:  # in place, so that fp32 and fp16 copies never coexist
            state[key] = state[key].half()
        save_file(state, files["fp16"], metadata={CONFIG_KEY: config.to_json()} if tiny else None)
        del state
        gc.collect()
    if not os.path.exists(files["finetuned"]):
        g = torch.Generator().manual_seed(1)
        deltas = {}
        with safe_open(files["fp32"], framework="pt") as f:
            for key in f.keys():
                if key.startswith((PREFIXES["unet"], PREFIXES["text_encoder"])):
                    w = f.get_tensor(key)
                    deltas[key] = (0.01 * w.std() * torch.randn(w.shape, generator=g)).half() if w.numel() > 1 \
                        else torch.zeros_like(w).half()
        save_file(deltas, files["finetuned"], metadata={
            "sine.finetuned": "1", "base": os.path.basename(files["fp32"]), "base_fingerprint": fingerprint(files["fp32"]),
            "prompt": PROMPT, "position_map": "True", "source_size": "512x512", "steps": "0"})
        del deltas
    # Our configs in diffusers' names, for from_single_file(config=...): SD v1's, or the tiny model's.
    unet, vae = config.unet, config.vae
    widths, levels = [unet.model_channels * m for m in unet.channel_mult], range(len(unet.channel_mult))
    with torch.device("meta"):
        UNet2DConditionModel(
            sample_size=64, in_channels=unet.in_channels, out_channels=unet.out_channels, block_out_channels=widths,
            down_block_types=["CrossAttnDownBlock2D" if i in unet.attention_levels else "DownBlock2D" for i in levels],
            up_block_types=["CrossAttnUpBlock2D" if i in unet.attention_levels else "UpBlock2D" for i in reversed(levels)],
            layers_per_block=unet.num_res_blocks, cross_attention_dim=unet.context_dim,
            attention_head_dim=unet.num_heads,  # diffusers' historical name for the number of heads
        ).save_config(os.path.join(files["diffusers_config"], "unet"))
        AutoencoderKL(
            sample_size=512, block_out_channels=[vae.ch * m for m in vae.ch_mult], layers_per_block=vae.num_res_blocks,
            latent_channels=vae.z_channels, down_block_types=["DownEncoderBlock2D"] * len(vae.ch_mult),
            up_block_types=["UpDecoderBlock2D"] * len(vae.ch_mult),
        ).save_config(os.path.join(files["diffusers_config"], "vae"))
    return {"job": "prepare"}


# =============================================================================================
# The plan, and the report

def plan(args):
    """The measurements, in order. --quick trims sizes and repeats so that a 2-core CPU finishes in
    under 15 minutes: a 256x256 10-step edit, two timed runs of the slow jobs, no variants that
    bench.py has already shown not to help on a CPU (channels_last)."""
    cuda, quick = args.device.startswith("cuda"), args.quick
    jobs = []

    def add(bench, sides=("ours", "diffusers"), repeats=3, **kw):
        for side in sides:
            jobs.append(Job(bench, side, args.device, repeats=args.repeats or repeats, tiny=args.tiny, **kw))

    # (a) one UNet forward: fp32 and bf16 against diffusers, then our other switches one by one
    add("unet")
    add("unet", repeats=2 if quick else 3, bf16=True)
    if cuda or not quick:
        add("unet", ("ours",), bf16=True, channels_last=True)
        add("unet", ("ours",), channels_last=True)
        add("unet", ("ours",), sdpa=False)
    if args.compile:
        add("unet", bf16=cuda, compile=True)
    # (b) a whole edit, fp32 against diffusers; bf16 (speed-up and drift against fp32). Its
    # weights are already in memory when timing starts, so the first run needs no warm-up.
    # (A GPU's first run also tunes its kernels: one untimed run there.)
    edit = dict(size=256, steps=10, repeats=2, warmup=0) if quick else dict(size=512, steps=50, warmup=int(cuda))
    add("edit", **edit)
    add("edit", ("ours",) if quick else ("ours", "diffusers"), bf16=True, **edit)
    if cuda:  # fp16, as SD v1 is usually run on a GPU
        add("unet", fp16=True)
        add("edit", fp16=True, **edit)
    # edit.py's CPU defaults: fp32 or bf16, each with and without channels_last
    add("edit", ("ours",), bf16=True, channels_last=True, **{**edit, "repeats": 1 if quick else 3})
    add("edit", ("ours",), channels_last=True, **{**edit, "repeats": 1 if quick else 3})
    # (c) one training step, as train.py runs it on that device (checkpointing on; CUDA: bf16),
    # then as it ran before AdamW moved into backward (CPU: without checkpointing), then train.py
    # itself for two steps: the whole process's peak, loading and saving included. The warm-up
    # step allocates AdamW's state.
    add("train", repeats=2 if quick else 3, bf16=cuda, grad_checkpointing=True)
    add("train", ("ours",), repeats=2 if quick else 3, bf16=cuda, grad_checkpointing=cuda, adamw_after_backward=True)
    if cuda or not quick:
        add("train", bf16=not cuda, grad_checkpointing=True)
    add("trainpy", ("ours",), repeats=1, warmup=0, bf16=cuda, grad_checkpointing=True)
    add("train", ("ours",), repeats=2 if quick else 3, bf16=cuda, grad_checkpointing=True, lora=8)
    add("trainpy", ("ours",), repeats=1, warmup=0, bf16=cuda, grad_checkpointing=True, lora=8)
    if not quick:
        add("trainpy", ("ours",), repeats=1, warmup=0, bf16=cuda, grad_checkpointing=False)
    # (d) loading, from the OS file cache; each run in its own process
    for _ in range(1 if quick else 3):
        add("load", repeats=1, warmup=0)
    # the tiled VAE decode against the untiled one: 640 x 640 is 2 x 2 tiles of 512
    vae = dict(size=640, repeats=1, warmup=0) if quick else dict(size=1024)
    add("vae", ("ours",), **vae)
    add("vae", ("ours",), tiled=True, **vae)
    if args.big:
        add("big", ("ours",), repeats=1, warmup=0, size=2048, bf16=cuda)
    if args.only:
        jobs = [j for j in jobs if j.bench in args.only.split(",")]
    return jobs


def unet_tflop(latent_hw, batch, tiny=False):
    """FLOPs of one UNet forward, counted by PyTorch on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.unet import UNet
    cfg = sd_config(tiny).unet
    with torch.device("meta"):
        unet = UNet(cfg)
        x, t = torch.zeros(batch, 4, *latent_hw), torch.zeros(batch, dtype=torch.long)
        c = torch.zeros(batch, 77, cfg.context_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, t, c)
    return counter.get_total_flops() / 1e12


def edit_tflop(size, steps, tiny=False):
    from model.ddim import ddim_timesteps
    guided = sum(1 for t in ddim_timesteps(steps).tolist() if t > K)
    latent = (size // 8, size // 8)
    return steps * unet_tflop(latent, 2, tiny) + guided * unet_tflop(latent, 1, tiny), steps * 2 + guided


def run_job(job, log):
    command = [sys.executable, "-m", "tools.bench", "--worker", json.dumps(asdict(job))]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    log.write(f"\n$ {job.name}\n{proc.stderr}")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        print(f"  {job.name}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
        return None
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - start
    times = result.get("times")
    if not times:
        print(f"  {job.name}: done in {result['wall_s']:.0f} s", flush=True)
        return result
    print(f"  {job.name:34s} median {statistics.median(times):7.2f} s [{' '.join(f'{t:.2f}' for t in times)}]"
          f"  peak RSS {result['peak_rss_gb']:5.2f} GB"
          + (f"  peak CUDA {result['peak_cuda_gb']:5.2f} GB" if "peak_cuda_gb" in result else "")
          + (f"  per run: {result['minor_faults'] / 1e6:.2f} M page faults, {result['sys_s']:.1f} s system CPU"
             if "minor_faults" in result else "")
          + f"   ({len(times)} runs, process {result['wall_s']:.0f} s)", flush=True)
    return result


def compare(a, b):
    """(max |a - b|, mean |a - b|, max |b|) of two saved outputs."""
    from safetensors.torch import load_file
    x, y = load_file(a)["x"], load_file(b)["x"]
    d = (x - y).abs()
    return d.max().item(), d.mean().item(), y.abs().max().item()


def report(results, args):
    med = lambda name: statistics.median(results[name]["times"]) if results.get(name) else None
    peak = lambda name: results[name]["peak_rss_gb"] if results.get(name) else None
    cuda = args.device.startswith("cuda")
    mem = (lambda n: results[n].get("peak_cuda_gb")) if cuda else peak
    unit = "peak CUDA GB" if cuda else "peak RSS GB"
    lines = []
    say = lines.append
    fmt = lambda x, f="{:.2f}": "-" if x is None else f.format(x)
    ratio = lambda a, b: None if a is None or b is None else a / b

    say(f"\n## Results ({args.device})\n")
    tf = unet_tflop((64, 64), 2, args.tiny)
    say(f"(a) UNet forward, batch 2, 64x64 latents: {tf:.2f} TFLOP per call (PyTorch's count)\n")
    say(f"| variant | ours s | diffusers s | ours/diffusers | ours TFLOP/s | ours {unit} | diffusers {unit} |")
    say("|---|---|---|---|---|---|---|")
    for v in ("fp32", "bf16", "bf16+channels_last", "channels_last", "no-sdpa", "compile", "bf16+compile"):
        o, d = f"unet/ours/{v}", f"unet/diffusers/{v}"
        if o in results or d in results:
            say(f"| {v} | {fmt(med(o))} | {fmt(med(d))} | {fmt(ratio(med(o), med(d)))} | "
                f"{fmt(ratio(tf, med(o)), '{:.3f}')} | {fmt(mem(o))} | {fmt(mem(d))} |")
    for v in ("bf16", "bf16+channels_last", "channels_last", "no-sdpa"):
        if results.get(f"unet/ours/{v}") and results.get("unet/ours/fp32"):
            max_d, mean_d, top = compare(results[f"unet/ours/{v}"]["output"], results["unet/ours/fp32"]["output"])
            say(f"- ours {v} against ours fp32: max |diff| / max |fp32| = {max_d / top:.2e}")
    if results.get("unet/ours/fp32") and results.get("unet/diffusers/fp32"):
        max_d, _, top = compare(results["unet/ours/fp32"]["output"], results["unet/diffusers/fp32"]["output"])
        say(f"- same work: ours fp32 against diffusers fp32, max |diff| / max |ref| = {max_d / top:.2e}")

    size, steps = (256, 10) if args.quick else (512, 50)
    edit_tf, passes = edit_tflop(size, steps, args.tiny)
    say(f"\n(b) Whole edit, {size}x{size}, {steps} DDIM steps, K={K}, v={V}: {passes} UNet passes, "
        f"{edit_tf:.1f} TFLOP in the UNet, plus prompts and VAE decode\n")
    say(f"| variant | ours s | diffusers s | ours/diffusers | ours UNet TFLOP/s | ours {unit} | diffusers {unit} |")
    say("|---|---|---|---|---|---|---|")
    for v in ("fp32", "bf16", "bf16+channels_last", "channels_last"):
        o, d = f"edit/ours/{v}", f"edit/diffusers/{v}"
        if o in results or d in results:
            say(f"| {v} | {fmt(med(o))} | {fmt(med(d))} | {fmt(ratio(med(o), med(d)))} | "
                f"{fmt(ratio(edit_tf, med(o)), '{:.3f}')} | {fmt(mem(o))} | {fmt(mem(d))} |")
    if med("edit/ours/bf16") and med("edit/ours/fp32"):
        say(f"- bf16 autocast speed-up over fp32 (ours): {med('edit/ours/fp32') / med('edit/ours/bf16'):.2f}x")
        max_d, mean_d, _ = compare(results["edit/ours/bf16"]["output"], results["edit/ours/fp32"]["output"])
        say(f"- bf16 drift from fp32, same seed, pixels in [-1, 1]: max |diff| {max_d:.3f}, mean |diff| {mean_d:.4f}")
    fastest = min((v for v in ("fp32", "bf16", "bf16+channels_last", "channels_last") if med(f"edit/ours/{v}")),
                  key=lambda v: med(f"edit/ours/{v}"), default=None)
    if fastest:
        say(f"- fastest here: {fastest}, {med('edit/ours/fp32') / med(f'edit/ours/{fastest}'):.2f}x fp32's speed")
    for n in (f"edit/{side}/{v}" for v in ("fp32", "bf16") for side in ("ours", "diffusers")):
        if results.get(n):
            say(f"- {n}: {results[n]['minor_faults'] / 1e6:.2f} M page faults and {results[n]['sys_s']:.1f} s "
                "of system CPU per edit")
    if results.get("edit/ours/fp32") and results.get("edit/diffusers/fp32"):
        max_d, mean_d, _ = compare(results["edit/ours/fp32"]["output"], results["edit/diffusers/fp32"]["output"])
        say(f"- same work: ours fp32 against diffusers fp32, pixels: max |diff| {max_d:.2e}, mean {mean_d:.2e}")

    say("\n(c) Fine-tuning step, batch 1, 512x512 crop, UNet + text encoder trainable, AdamW (fp32 weights)\n")
    say(f"| variant | ours s | diffusers s | ours/diffusers | AdamW update s, ours / diffusers | ours {unit} | "
        f"diffusers {unit} | losses ours / diffusers |")
    say("|---|---|---|---|---|---|---|---|")
    for v in dict.fromkeys(n.split("/", 2)[2] for n in results if n.startswith("train/")):
        o, d = f"train/ours/{v}", f"train/diffusers/{v}"
        if o in results or d in results:
            losses = lambda n: " ".join(f"{x:.4f}" for x in results[n]["losses"]) if results.get(n) else "-"
            adamw = lambda n: fmt(statistics.median(results[n]["adamw_s"])) if results.get(n, {}).get("adamw_s") else "-"
            say(f"| {v} | {fmt(med(o))} | {fmt(med(d))} | {fmt(ratio(med(o), med(d)))} | {adamw(o)} / {adamw(d)} | "
                f"{fmt(mem(o))} | {fmt(mem(d))} | {losses(o)} / {losses(d)} |")
    say("- the AdamW update reads and writes 28 bytes per trainable parameter (983 M): 27.5 GB of memory "
        "traffic per step, its floor on any device")
    say("- adamw-after-backward: the step before AdamW moved into backward, keeping every gradient until "
        "optimizer.step(); without that switch AdamW runs during backward and is not timed apart")
    for n in (n for n in results if n.startswith("trainpy/") and results[n]):
        say(f"- {n}: `train.py --steps 2` as a user runs it, {results[n]['times'][0]:.0f} s in all; peak RSS of "
            f"the whole process, loading and saving included: {results[n]['peak_rss_gb']:.2f} GB")

    say("\n(d) Loading the fp16 checkpoint into fp32 modules (file in the OS cache)\n")
    say("| side | median s | peak RSS GB | peak / fp32 model size (4.26 GB) |")
    say("|---|---|---|---|")
    for side in ("ours", "diffusers"):
        runs = results.get(f"load/{side}/fp32") or []
        if runs:
            t = statistics.median(r["times"][0] for r in runs)
            p = statistics.median(r["peak_rss_gb"] for r in runs)
            say(f"| {side} | {t:.2f} | {p:.2f} | {p / FP32_MODEL_GB:.2f} |")

    vae = sorted({n.split("/")[2] for n in results if n.startswith("vae/") and results[n]})
    if vae:
        say("\nVAE decode, ours, untiled against tiled (tiles of 512 pixels, overlap >= 128)\n")
        say(f"| variant | median s | {unit} |")
        say("|---|---|---|")
        for v in ("fp32", "tiled"):
            if results.get(f"vae/ours/{v}"):
                say(f"| {v} | {fmt(med(f'vae/ours/{v}'))} | {fmt(mem(f'vae/ours/{v}'))} |")
        if results.get("vae/ours/fp32") and results.get("vae/ours/tiled"):
            max_d, mean_d, _ = compare(results["vae/ours/tiled"]["output"], results["vae/ours/fp32"]["output"])
            say(f"- tiled against untiled, pixels (random weights, random latents): max |diff| {max_d:.3f}, "
                f"mean |diff| {mean_d:.4f}")
    big = results.get("big/ours/fp32") or results.get("big/ours/bf16")
    if big:
        say(f"\n2048x2048 edit, one guided step + tiled decode: {statistics.median(big['times']):.1f} s, "
            f"peak RSS {big['peak_rss_gb']:.2f} GB" + (f", peak CUDA {big['peak_cuda_gb']:.2f} GB" if cuda else ""))
    say("\nTargets")
    checks = []
    r = ratio(med("unet/ours/fp32"), med("unet/diffusers/fp32"))
    checks.append(("UNet forward fp32, ours/diffusers <= 1.0", r, r is not None and r <= 1.0))
    r = ratio(med("edit/ours/fp32"), med("edit/diffusers/fp32"))
    checks.append(("whole edit fp32, ours/diffusers <= 1.0", r, r is not None and r <= 1.0))
    runs = results.get("load/ours/fp32") or []
    p = statistics.median(x["peak_rss_gb"] for x in runs) if runs else None
    checks.append((f"loading fp16 -> fp32, peak RSS <= 1.5 x {FP32_MODEL_GB:.2f} GB", p,
                   p is not None and p <= 1.5 * FP32_MODEL_GB))
    r = ratio(med("edit/ours/fp32"), med("edit/ours/bf16"))
    checks.append(("whole edit, bf16 autocast >= 2x faster than fp32", r, r is not None and r >= 2.0))
    if not cuda:
        p = peak("trainpy/ours/grad-ckpt")
        checks.append(("train.py fp32, whole process with one step and the save, peak RSS <= 14 GB", p,
                       p is not None and p <= 14.0))
    if cuda:
        t = med("unet/ours/bf16")
        checks.append(("UNet forward bf16, TFLOP/s (floor: 0.80 TFLOP per image)", ratio(tf, t), None))
        t = med("edit/ours/bf16")
        checks.append(("512x512 edit bf16, s (floor >= 0.11 s on an H100)", t, None))
    for text, value, ok in checks:
        verdict = "not measured" if value is None else "" if ok is None else "OK" if ok else "MISSED"
        say(f"- {text}: {fmt(value)}  {verdict}".rstrip())
    return "\n".join(lines)


def describe(args):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                device = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        device += f", {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    return "\n".join([
        f"date:    {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"command: python -m {shlex.join(['tools.bench', *sys.argv[1:]])}",
        f"commit:  {commit}" + (f" (working tree based on {commit}, uncommitted changes)" if dirty else ""),
        f"device:  {device}",
        f"torch {torch.__version__}, diffusers {importlib.metadata.version('diffusers')}, "
        f"Python {platform.python_version()}",
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized: a 256x256 10-step edit, fewer repeats")
    p.add_argument("--only", help="comma-separated: unet,edit,train,trainpy,load,vae,big")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default: 2-3)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes to compile)")
    p.add_argument("--big", action="store_true", help="also the peak memory of a 2048x2048 edit")
    p.add_argument("--keep", metavar="DIR", help="write (or reuse) the random checkpoints in DIR and keep them")
    p.add_argument("--json", metavar="FILE", help="also write every raw measurement to FILE")
    p.add_argument("--tiny", action="store_true", help="the tiny test model: checks that bench.py runs (seconds)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(Job(**json.loads(args.worker)))
        print("RESULT " + json.dumps(result), flush=True)
        return

    start = time.perf_counter()
    print(describe(args), flush=True)
    folder = args.keep or tempfile.mkdtemp(prefix="sine-bench-")
    os.makedirs(folder, exist_ok=True)
    files = {"dir": folder, "fp32": os.path.join(folder, "base-fp32.safetensors"),
             "fp16": os.path.join(folder, "base-fp16.safetensors"),
             "finetuned": os.path.join(folder, "finetuned.safetensors"),
             "diffusers_config": os.path.join(folder, "diffusers-config"), "warm": True}
    results = {}
    log_path = os.path.join(folder, "workers.log")
    try:
        with open(log_path, "w") as log:
            print(f"writing random full-size checkpoints to {folder} ...", flush=True)
            run_job(Job("prepare", "ours", "cpu", repeats=0, tiny=args.tiny, files=files), log) or sys.exit("prepare failed")
            for job in plan(args):
                job.files = files
                result = run_job(job, log)
                if job.bench == "load":
                    results.setdefault(job.name, []).append(result) if result else None
                else:
                    results[job.name] = result
            text = report(results, args)
            print(text)
            print(f"\ntotal {time.perf_counter() - start:.0f} s; worker logs in {log_path}" if args.keep else
                  f"\ntotal {time.perf_counter() - start:.0f} s")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"describe": describe(args), "results": results}, f, indent=1)
    finally:
        if not args.keep:
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    os.remove(path)
            import shutil
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
