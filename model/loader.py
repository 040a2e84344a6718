"""Loading a Stable Diffusion v1 checkpoint: one flat safetensors file, three models inside.

    model.diffusion_model.*                    -> UNet
    first_stage_model.*                        -> VAE
    cond_stage_model.transformer.text_model.*  -> TextEncoder  (some files omit `text_model.`)

Our modules are named exactly like these keys, so loading is: strip the prefix, then
`load_state_dict(strict=True)`. No mapping table.

A checkpoint is an untrusted download. We never unpickle one (`.ckpt`, `.pt` and `.bin` files can
run code when loaded), and we read the safetensors header ourselves and check it against the
file's size before trusting it. Every problem a user can cause is a `CheckpointError` whose
message is one line saying what to do.

Writing: `write_safetensors` streams a file one tensor at a time, and `atomic_path` makes a save
all or nothing.
"""
import hashlib
import json
import math
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from safetensors import SafetensorError

from .clip import CLIPConfig, TextEncoder
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
CONFIG_KEY = "sd_config"        # safetensors metadata of a non-SD-v1-size file (e.g. model.tiny)
MAX_HEADER_BYTES = 100_000_000  # a real SD header is ~100 kB; a huge one is an attack or garbage
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# The layers whose weights autocast computes with in bf16 or fp16; norms stay fp32 under it.
AUTOCAST_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


class CheckpointError(ValueError):
    """A problem with a checkpoint file that the user can fix; the message is one line."""


@dataclass
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: CLIPConfig = field(default_factory=CLIPConfig)
    image_size: int = 512  # the base's native resolution, pixels a side: SINE crops to it

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        parts = json.loads(text)
        tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(UNetConfig(**tuples(parts["unet"])), VAEConfig(**tuples(parts["vae"])),
                   CLIPConfig(**tuples(parts["text_encoder"])), parts.get("image_size", 512))


@dataclass
class StableDiffusion:
    unet: UNet
    vae: VAE
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    config: SDConfig
    description: str  # what was loaded, e.g. "SD v1, EMA UNet weights, stored as fp16"
    file_keys: dict   # {"unet": {parameter name: key in the file}, "vae": ..., "text_encoder": ...}


# ---------------------------------------------------------------------------------------------
# Reading the file safely

def _pickle_error(path):
    return CheckpointError(f"{path} is a pickle file, which can run code when loaded; it was not opened. "
                           "Convert it to .safetensors first (or download the .safetensors version).")


def _looks_like_pickle(head, last):
    """torch.save's zip format starts with "PK"; a pickle starts with the PROTO opcode 0x80, or (the
    old text protocols) with GLOBAL "c", MARK "(" or an empty dict/list, and ends with STOP "."."""
    return head[:2] == b"PK" or head[:1] == b"\x80" or (head[:1] in (b"c", b"(", b"}", b"]") and last == b".")


def _parse_header(data):
    """The header's JSON as a dict, or None if it is not one."""
    try:
        header = json.loads(data)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, or absurd nesting
        return None
    return header if isinstance(header, dict) else None


def _valid_entry(entry):
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)
            and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str))


def _valid_metadata(metadata):
    return isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())


def read_header(path):
    """Validate a safetensors file without trusting it; return its header dict (tensors + metadata)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file" if not os.path.exists(path) else f"{path} is not a file")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise _pickle_error(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        # Checked before reading: a header longer than the file, or than any real one, is never read.
        fits = header_len is not None and header_len <= min(MAX_HEADER_BYTES, size - 8)
        header = _parse_header(f.read(header_len)) if fits else None
        f.seek(max(size - 1, 0))
        last = f.read(1)
    if header is None:
        # Only now look for a pickle: a valid header length can start with the same bytes.
        if _looks_like_pickle(head, last):
            raise _pickle_error(path)
        if header_len is None:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        if not fits:
            raise CheckpointError(f"{path} is not a valid safetensors file (its header claims {header_len} bytes)")
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header)")
    bad = [k for k, v in header.items() if not (_valid_metadata(v) if k == "__metadata__" else _valid_entry(v))]
    if bad:
        raise CheckpointError(f"{path} is not a valid safetensors file (bad header entry {bad[0]!r})")
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes on disk, {8 + header_len + data_end} "
                              f"expected. {how_to_replace(header.get('__metadata__'))}")
    return header


def how_to_replace(metadata):
    """What to do about a damaged file: the files train.py and export.py wrote are made again, not downloaded."""
    metadata = metadata or {}
    if "sine.finetuned" in metadata:
        return "train.py wrote it: fine-tune again, or use a copy"
    if "run" in metadata:  # train.py's resume state
        return ("train.py wrote it as a resume state, so this run cannot continue: start it again with "
                "--overwrite (the fine-tuned file saved beside it still works)")
    if "sine.exported_from" in metadata:
        return "export.py wrote it: export it again"
    return "Download it again."


def fingerprint(path):
    """A short id of a checkpoint's contents: its header plus 64 samples of its data (fast on 4 GB)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(0)
        digest.update(f.read(8 + header_len))
        for i in range(64):
            f.seek(8 + header_len + (size - 8 - header_len) * i // 64)
            digest.update(f.read(4096))
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Recognising what a file holds

def is_kohya_lora(header):
    """Adapters alone, under kohya's names (lora_unet_..., lora_te_...): what export.py --lora writes,
    and what AUTOMATIC1111's and ComfyUI's LoRA folders hold."""
    return any(key.startswith(("lora_unet_", "lora_te_")) for key in header)


def describe_lora(metadata):
    made_from = metadata.get("sine.exported_from")
    if made_from:
        return (f"a LoRA in kohya's layout, exported by export.py from {made_from} for AUTOMATIC1111 or ComfyUI: "
                f"sine itself takes {made_from}, the file train.py wrote (edit.py --finetuned)")
    return ("a LoRA in kohya's layout, made for AUTOMATIC1111 or ComfyUI: sine edits only with a model fine-tuned by "
            "its train.py, which also learns the position map (edit.py --finetuned)")


def describe_other_model(header):
    """Name the model family of a file that is not SD v1, or return None if it looks like SD v1."""
    keys = header.keys()
    shape = lambda k: header[k]["shape"] if k in header else None
    if any(k.startswith(("conditioner.embedders", "model.diffusion_model.label_emb")) for k in keys):
        return "an SDXL checkpoint"
    if any(k.startswith("cond_stage_model.model.") for k in keys) or \
            len(shape("model.diffusion_model.input_blocks.1.1.proj_in.weight") or [0, 0, 1, 1]) == 2:
        return "an SD 2.x checkpoint"
    first_conv = shape("model.diffusion_model.input_blocks.0.0.weight")
    if first_conv and first_conv[1] != 4:
        return f"an inpainting or depth checkpoint (its UNet takes {first_conv[1]} input channels)"
    if not any(k.startswith(PREFIXES["unet"]) for k in keys):
        return "not a Stable Diffusion checkpoint"
    return None


def _route(key):
    """Which part a file key belongs to, and its name inside that part (None: ignore the key)."""
    if "." not in key or key.endswith("position_ids") or key in ("model_ema.decay", "model_ema.num_updates"):
        return "ignore", None  # schedule buffers, EMA bookkeeping, CLIP's stored position ids
    if key.startswith("model_ema."):
        return "ema", key
    if key.startswith("cond_stage_model.transformer.") and not key.startswith(PREFIXES["text_encoder"]):
        key = key.replace("cond_stage_model.transformer.", PREFIXES["text_encoder"], 1)
    for part, prefix in PREFIXES.items():
        if key.startswith(prefix):
            return part, key[len(prefix):]
    return "unexpected", key


def _first(names, n=3):
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _load_part(module, names, header, path, device, dtype=torch.float32, adjust=None):
    """Fill a module built on the meta device with tensors read one at a time from the file: its
    Linear and Conv weights in dtype, every other tensor in fp32; adjust(name, w) changes each
    tensor, in fp32, before it is rounded."""
    expected = module.state_dict()
    missing, unexpected = set(expected) - set(names), set(names) - set(expected)
    if missing or unexpected:
        problem = f"missing keys {_first(missing)}" if missing else f"unexpected keys {_first(unexpected)}"
        raise CheckpointError(f"{path} does not match the SD v1 layout: {problem}")
    for name, file_key in names.items():
        shape, want = header[file_key]["shape"], list(expected[name].shape)
        if shape != want:
            raise CheckpointError(f"{path} does not match the SD v1 layout: {file_key} has shape {shape}, "
                                  f"SD v1 has {want}")
    low = {f"{owner}.{kind}" for owner, layer in module.named_modules()
           if isinstance(layer, AUTOCAST_LAYERS) for kind in ("weight", "bias")}
    state = {}
    for name, tensor in iter_tensors(path, header, names):  # fp32, on the CPU
        tensor = adjust(name, tensor) if adjust else tensor
        state[name] = tensor.to(device=device, dtype=dtype if name in low else torch.float32)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}


def iter_tensors(path, header, names, device="cpu", dtype=torch.float32):
    """(name, tensor) for names = {name: file key}, one at a time, each read with one read() into
    memory of its own and then converted (dtype None: kept as stored), so loading peaks at the
    loaded model plus one tensor.
    (safetensors' get_tensor maps the file instead: the whole file then counts as the process's
    memory for as long as the file is open or any of its tensors lives.)"""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        for name, key in names.items():
            entry = header[key]
            begin, end = entry["data_offsets"]
            file_dtype = FILE_DTYPES.get(entry["dtype"])
            if file_dtype is None or end - begin != math.prod(entry["shape"]) * file_dtype.itemsize:
                raise CheckpointError(f"{path} is not a valid safetensors file ({key}: {end - begin} bytes of "
                                      f"{entry['dtype']} for shape {entry['shape']})")
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(8 + header_len + begin)
            if f.readinto(raw.numpy()) != end - begin:  # the file shrank since read_header checked it
                raise CheckpointError(f"{path} is truncated: {key} is incomplete. "
                                      f"{how_to_replace(header.get('__metadata__'))}")
            yield name, raw.view(file_dtype).reshape(entry["shape"]).to(device=device, dtype=dtype or file_dtype)


def write_safetensors(f, shapes, tensors, metadata, dtype=torch.float16):
    """Write a safetensors file into the open file f one tensor at a time, so that writing needs
    memory for one tensor, not for the whole file. shapes = {key: shape}; tensors yields each key's
    tensor (of dtype, or of dtype[key] if dtype is a dict), in the same order.

    The format: 8 bytes of header length, the JSON header (each key's dtype, shape and byte range),
    padded with spaces to a multiple of 8, then the tensors' bytes back to back."""
    header, offset = {"__metadata__": metadata}, 0
    dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(shapes, dtype)
    for key, shape in shapes.items():
        size = math.prod(shape) * dtypes[key].itemsize
        dtype_name = next(name for name, d in FILE_DTYPES.items() if d == dtypes[key])
        header[key] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)) + text)
    for (key, shape), tensor in zip(shapes.items(), tensors, strict=True):
        if tensor.dtype != dtypes[key] or list(tensor.shape) != list(shape):
            raise ValueError(f"{key}: expected {dtypes[key]} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


@contextmanager
def atomic_path(path):
    """A temporary file beside path to write to; renamed to path once written. A crash, a full
    disk or an exception leaves the old file or the new one, never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except SafetensorError as e:  # how safetensors reports a full disk: "I/O error: No space left on device"
        raise OSError(str(e)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_sd_v1(path):
    """Read a base checkpoint's header and refuse anything but SD v1: (header, metadata). Fast."""
    header = read_header(path)
    path = os.fspath(path)
    metadata = header.pop("__metadata__", None) or {}
    if "sine.finetuned" in metadata:
        raise CheckpointError(f"{path} is a SINE fine-tuned file, not a base checkpoint; "
                              "pass it to edit.py --finetuned and give the SD v1 file as --base")
    if is_kohya_lora(header):
        raise CheckpointError(f"{path} is {describe_lora(metadata)}; it is not a base checkpoint")
    other = describe_other_model(header)
    if other:
        raise CheckpointError(f"{path} is {other}; sine needs a Stable Diffusion v1 file (e.g. v1-5-pruned-emaonly.safetensors)")
    return header, metadata


def read_config(path, metadata=None):
    """The sizes of a base checkpoint's parts: SD v1's, unless its metadata records others."""
    metadata = check_sd_v1(path)[1] if metadata is None else metadata
    try:
        return SDConfig.from_json(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else SDConfig()
    except (ValueError, TypeError, KeyError):
        raise CheckpointError(f"{path} has an unreadable {CONFIG_KEY} entry in its metadata") from None


def load_sd(path, device="cpu", dtype=torch.float32, ema=True, adjust=None, shared_vae=None):
    """Load an SD v1 safetensors checkpoint (or a `model.tiny` one) into our modules.

    dtype is for the UNet's Linear and Conv weights, which is what autocast computes with; norms,
    the text encoder and the VAE stay fp32 (the VAE overflows fp16). adjust(part, name, w) changes
    each UNet and text-encoder weight, in fp32, before it is rounded to dtype: sine.py adds a
    fine-tuned file's differences so. shared_vae: a loaded VAE to use instead of reading the file's."""
    header, metadata = check_sd_v1(path)
    path = os.fspath(path)
    config = read_config(path, metadata)

    names = {"unet": {}, "vae": {}, "text_encoder": {}, "ema": {}, "unexpected": {}, "ignore": {}}
    for key in header:
        part, name = _route(key)
        names[part][name] = key
    if names["unexpected"]:
        raise CheckpointError(f"{path} has keys that SD v1 does not: {_first(names['unexpected'])}")

    with torch.device("meta"):
        unet, vae, text_encoder = UNet(config.unet), VAE(config.vae) if shared_vae is None else shared_vae, TextEncoder(config.text_encoder)
    use_ema = ema and bool(names["ema"])
    if use_ema:
        # "Full" files keep EMA weights under model_ema.*, with the dots removed from the UNet key.
        names["unet"] = {name: "model_ema." + ("diffusion_model." + name).replace(".", "")
                         for name in unet.state_dict()}
        missing = [k for k in names["unet"].values() if k not in header]
        if missing:
            raise CheckpointError(f"{path} has incomplete EMA weights: missing {_first(missing)}")
    part_adjust = lambda part: adjust and (lambda name, tensor: adjust(part, name, tensor))
    _load_part(unet, names["unet"], header, path, device, dtype, part_adjust("unet"))
    if shared_vae is None:
        _load_part(vae, names["vae"], header, path, device)  # always fp32: see model/vae.py, Precision
    _load_part(text_encoder, names["text_encoder"], header, path, device, adjust=part_adjust("text_encoder"))

    stored = {v["dtype"] for k, v in header.items() if k.startswith("model.diffusion_model.")}
    kind = f"SD v1 layout, {config.image_size} px native" if CONFIG_KEY in metadata else "SD v1"
    description = (f"{os.path.basename(path)}: {kind}, "
                   f"{'EMA' if use_ema else 'non-EMA' if names['ema'] else 'the file'}'s UNet weights, "
                   f"stored as {'/'.join(sorted(stored)).lower()}")
    file_keys = {part: names[part] for part in PREFIXES}
    return StableDiffusion(unet, vae, text_encoder, Tokenizer(), config, description, file_keys)
