"""AdamW as train.py uses it: one plain AdamW stepped after backward, or, where the gradients do not
fit beside the model (SD v1 on a CPU or a smaller GPU), one that updates each weight during backward.
Either way train.py's loop reads loss.backward(); optimizer.step(); optimizer.zero_grad()."""
import torch

# SD v1 needs its memory savers (gradient checkpointing, AdamW in backward); a small model, such as
# the toy (toy/), fits anyway and would only pay their time. Small: at most this many bytes of fp32
# weights (the toy's UNet and text encoder: 33 MB; SD v1's: 3.9 GB; its rank-8 LoRA adapters: 9 MB).
SMALL = 256 * 2**20


def small(params):
    return 4 * sum(p.numel() for p in params) <= SMALL


class InBackward:
    """AdamW that updates each weight during backward, as soon as its gradient is complete, and then
    frees that gradient: SD v1's memory saver. The usual loss.backward(); optimizer.step() holds a
    whole set of gradients (3.9 GB for SD v1) until the step; here at most a few exist at once.

    One AdamW per weight, in single-tensor form (or fused, one kernel): the same arithmetic, weight
    by weight, as one AdamW over all of them, so the weights come out bitwise the same (a test in
    tests/test_training.py checks it). That holds with one backward a step, at any batch, and with
    no gradient clipping, which needs every gradient before any update. So step() and zero_grad()
    have nothing left to do; the loop calls them as for any optimizer."""

    def __init__(self, params, lr, weight_decay=0.01, fused=False):
        self.per_weight = {p: torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay, foreach=False, fused=fused)
                           for p in params}  # train.py saves each one's moments for --resume
        for param in params:
            param.register_post_accumulate_grad_hook(self.update)

    def update(self, param):
        self.per_weight[param].step()
        param.grad = None

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def make_optimizer(params, lr, room=0):
    """(the optimizer the loop steps, {parameter: the AdamW that holds its moments}).

    Large gradients are freed one by one during backward (InBackward). Small ones, or any that
    fit in `room` (bytes of a GPU's memory to spare), are kept for one plain AdamW after backward:
    the same arithmetic, bitwise, without an optimizer call for each of hundreds of parameters, which
    made a toy step on a CPU 20-30% slower (BENCHMARKS.md) and would bind a GPU's step to Python.
    fused: one kernel, not a dozen, for each update: a toy step a quarter faster."""
    if not small(params) and 4 * sum(p.numel() for p in params) > room:
        optimizer = InBackward(params, lr, weight_decay=0.01, fused=True)
        return optimizer, optimizer.per_weight
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    return optimizer, dict.fromkeys(params, optimizer)


def room_for_gradients(device, params):
    """Bytes of GPU memory left for a whole set of gradients once AdamW's moments (8 bytes a weight)
    and 3 GB for activations are set aside: enough for SD v1's 3.9 GB on a 24 GB card, not on 16 GB."""
    if device.type != "cuda":
        return 0
    return torch.cuda.mem_get_info(device)[0] - 8 * sum(p.numel() for p in params) - 3 * 2**30
