"""One training step, shared by the training loop, the throughput benchmark and the tests."""
import math

import torch


def build_optimizer(model, *, lr, weight_decay, betas):
    """AdamW over the trainable parts; decay only on matrices (model.param_groups decides which)."""
    groups = model.param_groups(weight_decay)  # tagged apply_weight_decay by the model
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def set_optimizer_schedule(optimizer, *, lr, weight_decay):
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["apply_weight_decay"]:
            group["weight_decay"] = weight_decay


def autocast_dtype(device, bf16):
    """bf16 autocast on CUDA when asked; fp32 (no autocast) on the CPU."""
    return torch.bfloat16 if (device.type == "cuda" and bf16) else None


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # hardware.compile_mode values that record CUDA graphs


def compile_forward(forward, mode="default", backend="inductor"):
    """torch.compile(forward) in hardware.compile_mode. "reduce-overhead" records the compiled forward
    and backward as CUDA graphs and replays them (launch overhead gone; inputs are copied into static
    buffers); "max-autotune-no-cudagraphs" benchmarks kernel choices while compiling (minutes), among
    them Triton matmuls with the next elementwise op fused into their epilogue; "max-autotune" does both.
    A mode is inductor's: other backends (the tests' "eager") ignore it."""
    mode = None if mode == "default" or backend != "inductor" else mode
    return torch.compile(forward, backend=backend, mode=mode)


def train_step(model, forward, optimizer, images, masks, *, lr, weight_decay, momentum,
               amp_dtype=None, clip_grad=0.0):
    """One H-JEPA step. Returns the forward's tensors plus `grad_norm`, all still on the device.

    `model` is the unwrapped HJEPA (for EMA and parameters); `forward` is what runs it: the model
    itself, its DDP wrapper or its torch.compile'd version. Nothing here reads a tensor back to the
    host, so the caller decides when to pay a device sync.
    """
    set_optimizer_schedule(optimizer, lr=lr, weight_decay=weight_decay)
    # A new step for CUDA graphs (hardware.compile_mode=reduce-overhead): the previous step's outputs
    # may now be overwritten by a replay. The caller reads each step's outputs before the next step.
    torch.compiler.cudagraph_mark_step_begin()

    # 1. targets (no grad, inside the model) and  2. predictions of every target block from the context
    with torch.autocast(device_type=images.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        out = forward(images, masks.ctx_idx, masks.tgt_idx, masks.tgt_pos)

    # 3. loss, backward, step
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else math.inf)
    optimizer.step()

    # 4. EMA of the target encoder (identical on every rank: same params, same momentum)
    model.update_target(momentum)
    return out


def masks_to_device(masks, device):
    """Index tensors to the device without a sync: pinned first, since a copy from pageable (numpy)
    memory makes CUDA drain the stream before it starts. The masks are fresh numpy arrays each step,
    so `pin_memory()` copies them into a block of torch's caching host allocator, which is not handed
    out again before the asynchronous copy has run: nothing can overwrite the source in flight."""
    def move(t):
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

    return type(masks)(ctx_idx=move(masks.ctx_idx), tgt_idx=move(masks.tgt_idx), tgt_pos=move(masks.tgt_pos),
                       tgt_shape=masks.tgt_shape)
