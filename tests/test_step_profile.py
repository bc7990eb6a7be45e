"""hjepa.step_profile: torch.profiler totals grouped into kinds of work, per step."""
import torch

from hjepa.step_profile import kernel_category, summarize_profile


def test_kernel_names_fall_into_their_kind_of_work():
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "matmul"
    assert kernel_category("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_category("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert kernel_category("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)") == "attention"
    assert kernel_category("triton_per_fused_native_layer_norm_0") == "inductor_fused"
    assert kernel_category("void at::native::(anonymous namespace)::fused_adamw_kernel") == "optimizer_ema"
    assert kernel_category("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert kernel_category("something_else") == "other"


def test_cpu_profile_totals_self_time_per_step_and_shares_sum_to_one():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            (a @ b).relu_()
    summary = summarize_profile(prof.key_averages(), steps=4, on_device=False, top=3)
    assert summary["total_ms_per_step"] > 0 and len(summary["top"]) <= 3
    assert abs(sum(c["share"] for c in summary["categories"].values()) - 1.0) < 0.01
    matmul = [row for row in summary["top"] if row["name"] in ("aten::mm", "aten::matmul")]
    assert matmul and matmul[0]["calls_per_step"] == 1.0
    assert summarize_profile(prof.key_averages(), steps=4, on_device=True)["total_ms_per_step"] == 0
