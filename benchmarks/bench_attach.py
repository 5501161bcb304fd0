"""Cost of attaching the P×T controller to a Hugging Face MoE, and host syncs on its routing path.

Question: how much does ``chronomoe_torch.attach`` add to a CPU training step of a tiny HF
Mixtral (forward, backward, AdamW step; the attached model also re-routes through the controller's
fields, observes its routing and ticks the controller in the optimizer's step pre-hook)? Budget:
≤ 5 %. And does the routing path (router + hook forward, its backward, the tick) ever synchronise
with the host (``aten._local_scalar_dense``: ``.item()``, ``bool(tensor)``, ``.tolist()``)?

Method: two copies of the same model (same weights), one attached; short blocks of steps (one
step by default) timed alternately (the order flips every repeat) in one process. The headline
overhead is the median over repeats of (attached block / adjacent plain block) − 1 in process
CPU time, which is robust to a machine shared with other jobs (adjacent blocks share its load);
its interquartile range, wall-clock figures and ratios of medians and minima are printed too.
Also reported: the CPU time of the controller tick inside the attached step (where it runs with
caches cold from the backward pass, several times its cost in a loop) and the aten ops one step
dispatches with and without the attachment (a count that does not depend on the machine's load).
Syncs are counted with a TorchDispatchMode.

Run: ``python benchmarks/bench_attach.py [--repeats 100] [--steps 1] [--threads N] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ---- config -----------------------------------------------------------------------------
MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)
BATCH, SEQ = 8, 64
BUDGET = 0.05


class SyncCounter(TorchDispatchMode):
    """Counts ops that copy a device value to the host (``count``) and all aten ops (``ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def build(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(**MODEL)
    cfg._attn_implementation = "sdpa"
    return MixtralForCausalLM(cfg).train()


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=g) for _ in range(n)]


def train_step(model, opt, x) -> None:
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_block(model, opt, xs) -> tuple[float, float]:
    """Seconds per step of one block: (wall clock, process CPU time). On a shared machine the
    CPU time is the steadier figure (it leaves out the time this process was descheduled); it
    equals the work done when torch runs on one thread (``--threads 1``)."""
    w0, c0 = time.perf_counter(), time.process_time()
    for x in xs:
        train_step(model, opt, x)
    return (time.perf_counter() - w0) / len(xs), (time.process_time() - c0) / len(xs)


def measure_overhead(repeats: int, steps: int) -> dict:
    from chronomoe_torch.attach import attach
    base = build()
    plain = copy.deepcopy(base)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    opt_att = torch.optim.AdamW(base.parameters(), lr=1e-4)
    # The tick's CPU time inside the step: step pre-hooks run in registration order, so these
    # two bracket the one attach() registers.
    tick_cpu: list[float] = []
    opt_att.register_step_pre_hook(lambda *a: tick_cpu.append(-time.process_time()))
    handle = attach(base, optimizer=opt_att)
    opt_att.register_step_pre_hook(lambda *a: tick_cpu.append(tick_cpu.pop() + time.process_time()))
    xs = batches(steps)
    for _ in range(max(2, 10 // steps)):                 # warm-up both paths
        time_block(plain, opt_plain, xs)
        time_block(base, opt_att, xs)
    tick_cpu.clear()
    t_plain, t_att = [], []
    for r in range(repeats):
        order = [(plain, opt_plain, t_plain), (base, opt_att, t_att)]
        if r % 2:
            order.reverse()
        for model, opt, out in order:
            out.append(time_block(model, opt, xs))
    res = {"ticks": handle.controller.num_ticks,
           "tick_cpu_ms_median": 1e3 * statistics.median(tick_cpu)}
    for i, clock in enumerate(("wall", "cpu")):
        p = [t[i] for t in t_plain]
        a = [t[i] for t in t_att]
        med_p, med_a = statistics.median(p), statistics.median(a)
        # Paired: each repeat's two adjacent blocks share the machine's load at that moment.
        ratios = [ta / tp - 1.0 for ta, tp in zip(a, p)]
        paired = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        res.update({f"{clock}_ms_plain_median": 1e3 * med_p,
                    f"{clock}_ms_attached_median": 1e3 * med_a,
                    f"{clock}_overhead_paired": paired,
                    f"{clock}_overhead_paired_iqr": [q1, q3],
                    f"{clock}_overhead_median": med_a / med_p - 1.0,
                    f"{clock}_overhead_min": min(a) / min(p) - 1.0})
    handle.detach()
    return res


def count_syncs() -> dict:
    """Syncs on the routing path alone (router + our hook, its backward, the tick), and in a
    whole training step with and without the attachment (the HF experts' own loop syncs: it
    tests ``expert_idx == num_experts`` on a tensor per hit expert)."""
    from chronomoe_torch.attach import attach
    model = build()
    router = model.model.layers[0].mlp.gate
    handle = attach(model)
    h_NH = torch.randn(BATCH * SEQ, MODEL["hidden_size"])
    out = {}
    with SyncCounter() as c:
        logits, gates, idx = router(h_NH)                 # hook: fields, re-route, observe
        (logits.sum() + gates.sum()).backward()
        handle.tick()
    out["routing_path"] = c.count
    with SyncCounter() as c:
        torch.zeros(()).item()
    out["counter_self_check_item"] = c.count              # must be 1: the counter works
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    handle.register_optimizer(opt)
    x = batches(1)[0]
    train_step(model, opt, x)                             # lazy state creation outside the count
    with SyncCounter() as c:
        train_step(model, opt, x)
    out["attached_step"] = c.count
    out["ops_attached_step"] = c.ops
    handle.detach()
    with SyncCounter() as c:
        train_step(model, opt, x)
    out["plain_step"] = c.count
    out["ops_plain_step"] = c.ops
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", type=str, default=None, help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    syncs = count_syncs()
    res = measure_overhead(args.repeats, args.steps)
    res.update({f"syncs_{k}": v for k, v in syncs.items()}, threads=torch.get_num_threads(),
               model=MODEL, batch=[BATCH, SEQ], repeats=args.repeats, steps=args.steps)
    print(f"tiny HF Mixtral: {MODEL['num_hidden_layers']} layers, "
          f"{MODEL['num_local_experts']} experts top-{MODEL['num_experts_per_tok']}, "
          f"hidden {MODEL['hidden_size']}, batch {BATCH}x{SEQ}, {res['threads']} threads")
    for clock in ("wall", "cpu"):
        q1, q3 = res[f"{clock}_overhead_paired_iqr"]
        print(f"{clock:>4} time per step (median of {args.repeats} blocks): plain "
              f"{res[f'{clock}_ms_plain_median']:.2f} ms, attached "
              f"{res[f'{clock}_ms_attached_median']:.2f} ms; overhead: median of paired ratios "
              f"{100 * res[f'{clock}_overhead_paired']:+.2f}% (IQR {100 * q1:+.2f}% .. "
              f"{100 * q3:+.2f}%), ratio of medians "
              f"{100 * res[f'{clock}_overhead_median']:+.2f}%, ratio of minima "
              f"{100 * res[f'{clock}_overhead_min']:+.2f}% (budget {100 * BUDGET:.0f}%)")
    print(f"controller tick inside the attached step: {res['tick_cpu_ms_median']:.3f} ms CPU "
          f"(median); aten ops per step: attached {syncs['ops_attached_step']} vs plain "
          f"{syncs['ops_plain_step']}")
    print(f"host syncs: routing path {syncs['routing_path']} (must be 0); whole step attached "
          f"{syncs['attached_step']} vs plain {syncs['plain_step']} (HF experts' own loop)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    ok = res["cpu_overhead_paired"] <= BUDGET and syncs["routing_path"] == 0 \
        and syncs["counter_self_check_item"] == 1
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
