"""Key drift from repeated re-rotation in the model's dtype (bf16): why a window key may be
rebased at most once in its life.

A rebase rotates cached keys back by -O in place; in bf16 every rotation rounds. If the
capacity sits at the position limit, every eviction would be a rebase and a key would be
rotated up to W/B times. This measures the damage: keys (bf16, at their original
positions) rotated back in N steps of ``--shift`` positions, each result stored in bf16,
against one rotation by the whole distance from the original (what the plugin does now:
rebases are >= span evicted tokens apart, so N <= 1; sink keys always come from their
pristine snapshot). Reported: relative key error and the resulting attention-logit
error against random queries (q.k / sqrt(D), in units of the logit's own spread).

    scripts/bench drift [--device cuda] [--head-dim 128] [--shift 16]
"""

from __future__ import annotations

import argparse

import torch
from common import save, table

from vllm_sink.core.rotary import rope_table, rotate, rotations_for_deltas

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--head-dim", type=int, default=128)
ap.add_argument("--theta", type=float, default=500000.0)
ap.add_argument("--keys", type=int, default=4096)
ap.add_argument("--shift", type=int, default=16, help="positions per rebase (one block)")
ap.add_argument("--rebases", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 128, 256])
args = ap.parse_args()

D, dev = args.head_dim, torch.device(args.device)
gen = torch.Generator().manual_seed(0)
inv_freq = 1.0 / (args.theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
most = max(args.rebases) * args.shift
table_f32 = rope_table(inv_freq, most + 4097).to(dev)
# Keys as a model writes them: bf16, already rotated to positions 4096 .. 4096 + n - 1.
raw = (torch.randn(args.keys, D, generator=gen) * 2.0).to(dev)
pos = torch.arange(args.keys) % 4096 + most
cos, sin = rotations_for_deltas(table_f32, pos.tolist())
keys = rotate(raw.to(torch.bfloat16), cos.to(dev), sin.to(dev), is_neox=True)
queries = torch.randn(args.keys, D, generator=gen).to(dev)

rows = []
for n in args.rebases:
    chained = keys
    c, s = (t.to(dev) for t in rotations_for_deltas(table_f32, [-args.shift]))
    for _ in range(n):
        chained = rotate(chained, c, s, is_neox=True)  # bf16 result each time
    c1, s1 = (t.to(dev) for t in rotations_for_deltas(table_f32, [-n * args.shift]))
    once = rotate(keys, c1, s1, is_neox=True)  # one rounding
    exact = rotate(keys.float(), c1, s1, is_neox=True)  # no rounding at all
    logits = (queries * exact).sum(-1) / D**0.5
    spread = float(logits.std())

    def err(x, exact=exact, logits=logits, spread=spread):
        rel = (x.float() - exact).norm(dim=-1) / exact.norm(dim=-1)
        dl = ((queries * x.float()).sum(-1) / D**0.5 - logits).abs()
        return (
            float(rel.mean()),
            float(rel.max()),
            float(dl.mean() / spread),
            float(dl.max() / spread),
        )

    ch, on = err(chained), err(once)
    rows.append(
        {
            "rebases": n,
            "chained_rel_mean": ch[0],
            "chained_rel_max": ch[1],
            "chained_logit_mean": ch[2],
            "chained_logit_max": ch[3],
            "once_rel_mean": on[0],
            "once_rel_max": on[1],
            "once_logit_mean": on[2],
            "once_logit_max": on[3],
        }
    )

cols = list(rows[0])
print(
    f"bf16 keys, head dim {D}, theta {args.theta:g}, {args.keys} keys, shift "
    f"{args.shift} per rebase, device {dev}; errors vs the exact float32 rotation "
    "(logit errors in units of the logits' standard deviation)"
)
print(table(rows, cols))
save(
    "drift",
    {"device": str(dev), "head_dim": D, "theta": args.theta, "shift": args.shift, "rows": rows},
)
