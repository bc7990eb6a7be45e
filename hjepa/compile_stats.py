"""What torch.compile did in this process: graphs compiled, and one record per dynamo compilation.

A step whose inputs keep their shapes compiles its graphs once; a count that grows after the first
steps means recompilations (each costs seconds to minutes, and past dynamo's recompile limit a frame
runs uncompiled). Benchmarks report both.
"""
import torch._dynamo.utils


def compiled_graphs():
    """Graphs dynamo has compiled in this process (every graph of every frame, recompilations included)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def cudagraph_skips():
    """Graphs that compile mode reduce-overhead ran without CUDA graphs (inductor skips them silently,
    e.g. for a CPU tensor or a mutated input); 0 when every compiled graph is replayed as one."""
    return torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]


def compilation_records():
    """Dynamo's per-compilation records (torch._dynamo.utils.get_compilation_metrics; [] where absent)."""
    return list(getattr(torch._dynamo.utils, "get_compilation_metrics", list)())


def compile_log(since=0):
    """[{id, frame, seconds, reason (, failed)}] of the compilations after the first `since` records."""
    def field(m, name):  # the record's fields vary between torch releases
        return getattr(m, name, None)

    return [{"id": str(field(m, "compile_id")), "frame": field(m, "co_name"),
             "seconds": round(field(m, "entire_frame_compile_time_s") or 0.0, 1),
             "reason": str(field(m, "recompile_reason") or "")[:300],
             **({"failed": str(field(m, "fail_reason"))[:300]} if field(m, "fail_reason") else {})}
            for m in compilation_records()[since:]]
