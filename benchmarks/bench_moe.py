"""MoE layer and model throughput and memory, as ratios measured in one process.

Questions (issue 3, "Speed and memory"):
  1. MoE layer forward+backward: tokens/s of the sparse layer (moe.SparseMoE, E=8, top-2) over an
     all-experts-on-all-tokens layer with the same weights (the prototype's dispatch).
     Target ≥ 3×.
  2. Peak memory of the MoE layer's forward+backward over a dense SwiGLU FFN of k× width
     (intermediate K·I, the same active FLOPs per token). Target ≤ 1.25×.
  3. Full model forward+backward tokens/s at hidden 128, 4 layers, 8 experts, top-2, seq 128,
     batch 8, enable_chronovisor=False (and, for reference, with the controller + ChronoMoELoss).

Memory method: ``torch.distributed._tools.mem_tracker.MemTracker`` (torch's own tracker; it works
on CPU) follows every tensor storage created and freed by the dispatcher during forward+backward
and keeps the peak of the live total. We report peak − (parameters + buffers + the input), i.e.
the memory the pass itself needs: activations saved for backward, temporaries, and gradients.
"act" runs the backward for the input's gradient only (``loss.backward(inputs=[x])``), so
it excludes the parameter gradients, which are parameter-sized and so E/K× larger for the MoE by
construction; the target is read on "act", and "total" (full ``backward()``) is printed beside it.

Timing: interleaved repeats (A, B, A, B, …) after warm-up; the median of each. On a shared
machine the absolute figures move; the ratios are what to read. One CPU thread by default: on a
machine shared with other jobs, torch's OpenMP threads spin against them and the figures become
noise (we saw a 25× slowdown of the model step with 2 threads on 2 busy cores).

Run:  python benchmarks/bench_moe.py [--tokens 4096] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from chronomoe_torch.loss import ChronoMoELoss
from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
from chronomoe_torch.moe import SparseMoE

H, I, E, K = 128, 256, 8, 2


class AllExpertsMoE(nn.Module):
    """Every expert on every token, combined with dense gates (zero off the top-k): the
    prototype's dispatch. Shares the sparse layer's parameters."""

    def __init__(self, sparse: SparseMoE) -> None:
        super().__init__()
        self.sparse = sparse

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        m = self.sparse
        r = m.router(x_NH)
        gates_NE = torch.zeros_like(r.probs_NE).scatter(1, r.expert_idx_NK, r.gate_NK)
        out_NH = torch.zeros_like(x_NH)
        for e in range(m.num_experts):
            h_NI = F.silu(x_NH @ m.w_gate_EHI[e]) * (x_NH @ m.w_up_EHI[e])
            out_NH = out_NH + gates_NE[:, e:e + 1] * (h_NI @ m.w_down_EIH[e])
        return out_NH


class DenseFFN(nn.Module):
    """A dense SwiGLU FFN of width K·I: the same active FLOPs per token as the MoE."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(hidden, width) * 0.02)
        self.w_up = nn.Parameter(torch.randn(hidden, width) * 0.02)
        self.w_down = nn.Parameter(torch.randn(width, hidden) * 0.02)

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        return (F.silu(x_NH @ self.w_gate) * (x_NH @ self.w_up)) @ self.w_down


def make_sparse(backend: str = "auto") -> SparseMoE:
    moe = SparseMoE(H, I, E, K, backend=backend)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return moe


def layer_out(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    return y[0] if isinstance(y, tuple) else y


def fwd_bwd(layer: nn.Module, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    layer_out(layer, x).square().mean().backward()


def time_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, measured in interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_bytes(layer: nn.Module, x: torch.Tensor, param_grads: bool) -> int:
    """Peak live bytes of one forward+backward beyond parameters, buffers and the input."""
    from torch.distributed._tools.mem_tracker import MemTracker
    layer.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_()
    mt = MemTracker()
    mt.track_external(layer, xg)
    with mt:
        loss = layer_out(layer, xg).square().mean()
        if not param_grads:  # only the input's gradient: no weight-gradient GEMMs or grads
            for p in layer.parameters():
                p.grad = None
            xg.retain_grad()
        loss.backward(inputs=None if param_grads else [xg])
    snap = mt.get_tracker_snapshot("peak")[x.device]
    fixed = sum(t.numel() * t.element_size()
                for t in [*layer.parameters(), *layer.buffers(), xg])
    return snap["Total"] - fixed


def bench_layer(tokens: int, repeats: int) -> None:
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(1))
    sparse = make_sparse("auto")
    loop = make_sparse("loop")
    dense_all = AllExpertsMoE(make_sparse("auto"))
    t = time_interleaved({
        "sparse": lambda: fwd_bwd(sparse, x),
        "sparse_loop": lambda: fwd_bwd(loop, x),
        "all_experts": lambda: fwd_bwd(dense_all, x),
    }, repeats)
    print(f"[1] MoE layer fwd+bwd, N={tokens} tokens, H={H}, I={I}, E={E}, top-{K} "
          f"(CPU threads: {torch.get_num_threads()})")
    for name, s in t.items():
        print(f"    {name:12s} {tokens / s:12,.0f} tokens/s   ({s * 1e3:7.2f} ms)")
    print(f"    sparse (grouped_mm) / all-experts: {t['all_experts'] / t['sparse']:.2f}x  "
          f"(target >= 3x)")
    print(f"    sparse (loop)       / all-experts: {t['all_experts'] / t['sparse_loop']:.2f}x")

    dense = DenseFFN(H, K * I)
    print(f"[2] Peak memory of fwd+bwd beyond weights and input, N={tokens} tokens")
    for label, grads in (("act", False), ("total", True)):
        moe_b = peak_bytes(sparse, x, grads)
        moe_loop_b = peak_bytes(loop, x, grads)
        dense_b = peak_bytes(dense, x, grads)
        print(f"    {label:5s}: MoE {moe_b / 2**20:7.2f} MiB (loop {moe_loop_b / 2**20:7.2f} MiB)"
              f" | dense FFN width {K}·I {dense_b / 2**20:7.2f} MiB | MoE/dense "
              f"{moe_b / dense_b:.3f} (loop {moe_loop_b / dense_b:.3f})"
              + ("   (target <= 1.25)" if label == "act" else "   (param grads E/K x larger)"))


def bench_model(repeats: int) -> None:
    B, S = 8, 128
    base = dict(vocab_size=256, hidden_dim=128, num_layers=4, num_experts=8, top_k=2,
                num_heads=4, num_kv_heads=2, max_seq_length=S)
    ids = torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(0))
    plain = ChronovisorMixtralForCausalLM(MixtralConfig(enable_chronovisor=False, **base)).train()
    chrono = ChronovisorMixtralForCausalLM(MixtralConfig(enable_chronovisor=True, **base)).train()
    loss_fn = ChronoMoELoss()

    def step_plain():
        plain.zero_grad(set_to_none=True)
        plain(ids, labels=ids).loss.backward()

    def step_chrono():
        chrono.zero_grad(set_to_none=True)
        loss_fn(chrono(ids), ids, chrono.controller).total.backward()
        chrono.controller.tick()

    t = time_interleaved({"plain": step_plain, "chrono": step_chrono}, repeats)
    n = B * S
    print(f"[3] Model fwd+bwd, hidden 128, 4 layers, 8 experts, top-2, seq {S}, batch {B} "
          f"(vocab 256, intermediate {plain.config.intermediate_dim})")
    print(f"    enable_chronovisor=False, LM loss   {n / t['plain']:10,.0f} tokens/s "
          f"({t['plain'] * 1e3:.1f} ms/step)")
    print(f"    controller + ChronoMoELoss + tick   {n / t['chrono']:10,.0f} tokens/s "
          f"({t['chrono'] * 1e3:.1f} ms/step)  ratio {t['plain'] / t['chrono']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1; 0 keeps torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device cpu")
    bench_layer(args.tokens, args.repeats)
    bench_model(args.repeats)


if __name__ == "__main__":
    main()
