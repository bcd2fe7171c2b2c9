"""Recall past the window: a pass key planted d tokens before the question, in natural
filler text (KJV), asked at the end; accuracy per distance (StreamEval in miniature).

Variants, one engine (block size 32 on the CPU), the default model, greedy:

* ``dense``: plain dense attention (the request field ``"sink": false``), where the
  prompt fits the model's context: the ceiling;
* ``stream``: sinks + window, the fact in the user message (what StreamingLLM keeps:
  once the window has moved past the fact it is gone);
* ``pinned``: sinks + window, the same prompt, with ``pin_prompt_tokens`` covering the
  prompt up to the end of the fact (system part, instructions, fact): what a client
  that pins the part that matters gets;
* ``recall-ref``: ``vllm_sink.reference.recall`` (pure torch, float32, not the plugin:
  recall is not in the serving path yet), sinks + window + ``--recall-blocks`` k
  recalled blocks chosen by ``--score`` (rows ``recall-ref-mean``, ``recall-ref-max``),
  the fact in the user message as for ``stream``; prompts read in the plugin's chunks.
  Its rows also say in how many trials the fact had left the window and in how many a
  block of it was among the recalled ones at the first answer token.

Distances are multiples of the stream's capacity C (sinks + window). A trial is right
when the first number in the greedy answer is the key. Targets (issue #24): plain
streaming near 0 past the window; anything that claims recall within 0.9x dense where
dense fits, flat with distance beyond.

    scripts/bench recall                        # 20 trials per point, up to 16 C
    scripts/bench recall --trials 50 --far      # the full grid: 50 trials, up to 64 C
    scripts/bench recall --variants recall-ref --multiples 8,16   # some points again

Rows are merged into results/recall.json by distance and variant (``--fresh``: replace
it), each with its date. On a 2-core CPU the engine variants ran at ~50 prompt tokens/s
in all (float32), so long distances take long: 10 trials at 4 C took ~7 min
per variant.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time

from common import RESULTS, make_llm, save, shutdown, table

# C = 512; a request may pin up to 128 tokens (the head up to the fact is ~75).
SINK = {"sink_tokens": 4, "window_tokens": 480, "max_request_sink_tokens": 128}
INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will ask you for the pass key at the end.\n"
)
FACT = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key?"
ANSWER = "The pass key is"
SPLIT = "\x00SPLIT\x00"
CONTEXT = 8192  # SmolLM2-135M's max_position_embeddings: dense fits below it


class Prompts:
    """Token-exact prompts: chat template around [intro, fact, filler of d tokens,
    question], the assistant's answer started."""

    def __init__(self, tok, filler: list[int]) -> None:
        self.tok, self.filler = tok, filler

    def _template(self, system: str) -> tuple[list[int], list[int]]:
        text = self.tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": SPLIT}],
            add_generation_prompt=True,
            tokenize=False,
        )
        pre, post = text.split(SPLIT)
        enc = lambda s: self.tok.encode(s, add_special_tokens=False)  # noqa: E731
        return enc(pre), enc(post + ANSWER)

    def fact(self, key: str) -> list[int]:
        return self.tok.encode(FACT.format(key=key), add_special_tokens=False)

    def build(self, key: str, distance: int, offset: int) -> tuple[list[int], int]:
        """(prompt tokens, tokens up to the end of the fact)."""
        enc = lambda s: self.tok.encode(s, add_special_tokens=False)  # noqa: E731
        pre, post = self._template("You are a helpful assistant.")
        head = pre + enc(INTRO) + self.fact(key)
        filler = self.filler[offset : offset + distance]
        return head + filler + enc(QUESTION) + post, len(head)


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


ENGINE_VARIANTS = ("dense", "stream", "pinned")
VARIANTS = (*ENGINE_VARIANTS, "recall-ref")  # recall-ref rows: recall-ref-<score>


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--multiples", default="0.5,1,2,4,8,16", help="distances, in multiples of C")
    ap.add_argument("--far", action="store_true", help="add 64 C")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {VARIANTS}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recall-blocks", type=int, default=8, help="k of recall-ref")
    ap.add_argument("--score", default="mean", help="recall-ref's block score: mean or max")
    ap.add_argument("--refresh", type=int, default=1, help="recall-ref's refresh period")
    ap.add_argument(
        "--ppl-tokens",
        type=int,
        default=8192,
        help="KJV tokens for the perplexity check, plain stream vs recall-ref (0: skip)",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="replace results/recall.json instead of merging"
    )
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS):
        ap.error(f"--variants: choose from {VARIANTS}")
    multiples = [float(m) for m in args.multiples.split(",")] + ([64.0] if args.far else [])

    from transformers import AutoTokenizer

    from vllm_sink import default_model
    from vllm_sink.core.config import SinkConfig
    from vllm_sink.tools.kjv import kjv_tokens

    model = default_model()
    tok = AutoTokenizer.from_pretrained(model)
    filler = kjv_tokens(model)
    prompts = Prompts(tok, filler)
    C = SinkConfig.from_section(SINK).resolve(32, 8192).capacity
    rows = []
    engine = [v for v in ENGINE_VARIANTS if v in variants]
    if engine:
        rows += engine_variants(args, model, prompts, multiples, C, engine)
    ppl = {}
    if "recall-ref" in variants:
        rows += recall_reference(args, model, tok, prompts, multiples, C)
        if args.ppl_tokens:
            ppl = perplexity(args, model, filler)
    rows, ppl = _merge(rows, ppl, args.fresh)
    print()
    print(table(rows, ["distance", "x C", "variant", "accuracy", "trials", "prompt tokens"]))
    save(
        "recall",
        {
            "sink": SINK,
            "capacity": C,
            "model_context": CONTEXT,
            "recall_ref": {
                "recall_blocks": args.recall_blocks,
                "score": args.score,
                "refresh": args.refresh,
            },
            "rows": rows,
            "perplexity": ppl,
        },
    )
    _plot(rows, C)
    return 0


def _merge(rows: list[dict], ppl: dict, fresh: bool) -> tuple[list[dict], dict]:
    """This run's rows over the saved ones (a row per distance and variant)."""
    path = RESULTS / "recall.json"
    if fresh or not path.exists():
        return sorted(rows, key=_order), ppl
    saved = json.loads(path.read_text())
    mine = {(r["distance"], r["variant"]) for r in rows}
    kept = [r for r in saved.get("rows", []) if (r["distance"], r["variant"]) not in mine]
    return sorted(kept + rows, key=_order), {**saved.get("perplexity", {}), **ppl}


def _order(row: dict) -> tuple:
    names = (*ENGINE_VARIANTS, "recall-ref-mean", "recall-ref-max")
    return (row["distance"], names.index(row["variant"]))


def engine_variants(args, model, prompts, multiples, C, variants) -> list[dict]:
    """dense, stream and pinned: one sink engine, requests choosing their layout."""
    from vllm import SamplingParams

    llm = make_llm(model, SINK, dtype="float32", kv_cache_memory_bytes=4 << 30, max_num_seqs=64)
    rows = []
    try:
        for mult in multiples:
            d = int(mult * C)
            trials = _trials(args, d, len(prompts.filler))
            built = [prompts.build(k, d, off) for k, off in trials]
            for variant in variants:
                if variant == "dense" and max(len(p) for p, _ in built) + 8 > CONTEXT:
                    continue  # past the model's context: dense cannot run it
                fields = [
                    False
                    if variant == "dense"
                    else {"pin_prompt_tokens": head}
                    if variant == "pinned"
                    else {}
                    for _, head in built
                ]
                params = [
                    SamplingParams(temperature=0, max_tokens=8, extra_args={"sink": f})
                    for f in fields
                ]
                outs = llm.generate(
                    [{"prompt_token_ids": p} for p, _ in built], params, use_tqdm=False
                )
                answers = [o.outputs[0].text for o in outs]
                rows.append(_row(d, mult, variant, trials, answers, len(built[0][0])))
    finally:
        shutdown(llm)
    return rows


def _row(d, mult, variant, trials, answers, prompt_tokens) -> dict:
    right = sum(first_number(a) == key for a, (key, _) in zip(answers, trials))
    row = {
        "distance": d,
        "x C": mult,
        "variant": variant,
        "accuracy": right / len(trials),
        "trials": len(trials),
        "example": answers[0].strip()[:40],
        "prompt tokens": prompt_tokens,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(table([row], ["distance", "x C", "variant", "accuracy", "example"]))
    return row


def _trials(args, d: int, filler_len: int) -> list[tuple[str, int]]:
    rng = random.Random(args.seed * 1000 + d)
    return [
        (str(rng.randrange(10000, 100000)), rng.randrange(0, filler_len - d - 1))
        for _ in range(args.trials)
    ]


def recall_reference(args, model, tok, prompts, multiples, C) -> list[dict]:
    """The recall-ref variant: the same trials through the pure-torch recall reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_sink.core.policy import prefill_steps
    from vllm_sink.reference.recall import RecallReference

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ref = RecallReference(
        hf,
        recall_blocks=args.recall_blocks,
        refresh=args.refresh,
        score=args.score,
        **_reference_kw(),
    )
    rows = []
    for mult in multiples:
        d = int(mult * C)
        trials = _trials(args, d, len(prompts.filler))
        answers, hits, evicted = [], 0, 0
        for key, off in trials:
            prompt, head = prompts.build(key, d, off)
            stream = ref.stream()
            for n in prefill_steps(ref.layout, len(prompt)):
                lp = stream.step(prompt[stream.total : stream.total + n])[-1]
            out = []
            for i in range(8):
                out.append(int(lp.argmax()))
                lp = stream.step(out[-1:])[-1]
                if i == 0:  # the first answer step: was a block of the fact recalled?
                    fact = _fact_blocks(ref.layout, head, len(prompts.fact(key)))
                    evicted += bool(fact) and max(fact) < stream.evicted_blocks
                    hits += bool(set(fact) & set(stream.selected))
            answers.append(tok.decode(out))
        name = f"recall-ref-{args.score}"
        row = _row(d, mult, name, trials, answers, len(prompt))
        row.update(
            recall_blocks=args.recall_blocks,
            score=args.score,
            refresh=args.refresh,
            # trials whose fact had left the window, and those where a block of it was
            # among the recalled ones at the first answer token
            fact_evicted=evicted / len(trials),
            fact_recalled=hits / len(trials),
        )
        print(f"  fact evicted in {evicted}, recalled in {hits} of {len(trials)} trials")
        rows.append(row)
    return rows


def _fact_blocks(layout, head: int, fact_len: int) -> list[int]:
    """Memory indices of the blocks holding the fact (stream tokens head - fact_len ..
    head - 1): evicted block i held stream tokens S + i B .. S + (i + 1) B - 1."""
    S, B = layout.sink_tokens, layout.block_size
    first, last = max(head - fact_len - S, 0) // B, (head - 1 - S) // B
    return list(range(first, last + 1)) if head - 1 >= S else []


def _reference_kw() -> dict:
    return {
        "block_size": 32,
        "sink_tokens": SINK["sink_tokens"],
        "window_tokens": SINK["window_tokens"],
        "position_limit": 8192,
    }


def perplexity(args, model, filler) -> dict:
    """Perplexity of a long KJV stream read in 64-token steps (each step scores the
    memory afresh): the plain reference vs the recall reference. Recall must not hurt
    it (target <= 1.02x plain)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from vllm_sink.reference import StreamingReference
    from vllm_sink.reference.recall import RecallReference

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokens = filler[100_000 : 100_000 + args.ppl_tokens]
    name = f"recall-ref-{args.score}"
    out = {"tokens": len(tokens), "step": 64, "k": args.recall_blocks}
    for variant, ref in (
        ("stream", StreamingReference(hf, **_reference_kw())),
        (
            name,
            RecallReference(
                hf,
                recall_blocks=args.recall_blocks,
                refresh=args.refresh,
                score=args.score,
                **_reference_kw(),
            ),
        ),
    ):
        lp = ref.stream().teacher_force(tokens, 64)[1:]
        out[variant] = math.exp(-float(lp.mean()))
    out[f"ratio {name}"] = out[name] / out["stream"]
    print(
        f"\nperplexity over {len(tokens)} KJV tokens (64-token steps): stream "
        f"{out['stream']:.3f}, {name} {out[name]:.3f} ({out[f'ratio {name}']:.4f}x)"
    )
    return out


def _plot(rows: list[dict], C: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = (
        ("dense", "k-o"),
        ("stream", "r-s"),
        ("pinned", "b-^"),
        ("recall-ref-mean", "g-d"),
        ("recall-ref-max", "g:x"),
    )
    for variant, style in styles:
        pts = [(r["x C"], r["accuracy"]) for r in rows if r["variant"] == variant]
        pts = [(x, a) for x, a in pts if a is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"distance of the fact before the question (x capacity C = {C})")
    ax.set_ylabel("pass-key accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.axvline(1, color="grey", lw=0.5)
    ax.legend()
    ax.set_title("Recall past the window (SmolLM2-135M-Instruct)")
    fig.tight_layout()
    fig.savefig(RESULTS / "recall.png", dpi=110)
    print(f"wrote {RESULTS / 'recall.png'}")


if __name__ == "__main__":
    raise SystemExit(main())
