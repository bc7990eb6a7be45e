"""Where a training step's time goes: torch.profiler's totals per kernel (CUDA) or per op (CPU), grouped.

bench/device_check.py profiles a few compiled ViT-S steps with it, so a GPU visit says which kind of
work to make faster before anyone tunes: matrix products, attention, inductor's fused elementwise and
normalisation kernels, the optimizer and EMA, copies.
"""
import re

from torch.autograd import DeviceType

# First match wins. Names as the libraries print them: cuBLAS / CUTLASS GEMMs (nvjet, xmma, wgmma;
# triton_tem_ = inductor's autotuned matmul templates), FlashAttention and memory-efficient attention
# (fmha), the fused AdamW and torch._foreach kernels (the EMA, grad clipping), inductor's generated
# Triton kernels (triton_poi_/triton_per_/triton_red_: fused elementwise, norms, reductions). cuDNN's
# attention runs helper kernels beside its flash kernels (cudnn::fusion::compute_dot_do_o, dq conversion).
KERNEL_CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|cudnn::fusion|dq_to_16bits", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|cublas|nvjet|xmma|wgmma|triton_tem|aten::(?:mm|bmm|addmm|linear)\b", re.I)),
    ("optimizer_ema", re.compile(r"adam|foreach|multi_tensor|optimizer", re.I)),
    ("inductor_fused", re.compile(r"^triton_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|^aten::(?:cat|index|gather|to)\b", re.I)),
)


def kernel_category(name):
    for category, pattern in KERNEL_CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def _time_us(event, on_device):
    if on_device:  # a kernel: its own device time (older torch names it cuda_time_total)
        return getattr(event, "self_device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
    return event.self_cpu_time_total  # self time: nested ops are not counted twice


def summarize_profile(events, steps, on_device, top=20):
    """Per-step totals of torch.profiler key_averages() `events` over `steps` steps.

    on_device: count CUDA kernels (their device time), else CPU ops (their self time). Returns
    dict(total_ms_per_step, categories={category: {ms_per_step, share}}, top=[{name, category,
    ms_per_step, share, calls_per_step}] of the `top` largest), shares of the total.
    """
    rows = []
    for event in events:
        if (event.device_type == DeviceType.CUDA) != on_device:
            continue
        us = _time_us(event, on_device)
        if us > 0:
            rows.append((event.key, us / 1000.0 / steps, event.count / steps))
    total = sum(ms for _, ms, _ in rows)
    categories = {}
    for name, ms, _ in rows:
        entry = categories.setdefault(kernel_category(name), {"ms_per_step": 0.0, "share": 0.0})
        entry["ms_per_step"] += ms
    for entry in categories.values():
        entry["share"] = round(entry["ms_per_step"] / total, 4) if total else 0.0
        entry["ms_per_step"] = round(entry["ms_per_step"], 3)
    rows.sort(key=lambda row: -row[1])
    return dict(total_ms_per_step=round(total, 3),
                categories=dict(sorted(categories.items(), key=lambda item: -item[1]["ms_per_step"])),
                top=[dict(name=name[:160], category=kernel_category(name), ms_per_step=round(ms, 3),
                          share=round(ms / total, 4) if total else 0.0, calls_per_step=round(calls, 2))
                     for name, ms, calls in rows[:top]])
