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
  recalled blocks chosen by ``--score``, the fact in the user message as for
  ``stream``; prompts read in the plugin's chunks.

Distances are multiples of the stream's capacity C (sinks + window). A trial is right
when the first number in the greedy answer is the key. Targets (issue #24): plain
streaming near 0 past the window; anything that claims recall within 0.9x dense where
dense fits, flat with distance beyond.

    scripts/bench recall                        # 20 trials per point, up to 16 C
    scripts/bench recall --trials 50 --far      # the full grid: 50 trials, up to 64 C
"""

from __future__ import annotations

import argparse
import random
import re

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

    def build(self, key: str, distance: int, offset: int) -> tuple[list[int], int]:
        """(prompt tokens, tokens up to the end of the fact)."""
        enc = lambda s: self.tok.encode(s, add_special_tokens=False)  # noqa: E731
        pre, post = self._template("You are a helpful assistant.")
        head = pre + enc(INTRO) + enc(FACT.format(key=key))
        filler = self.filler[offset : offset + distance]
        return head + filler + enc(QUESTION) + post, len(head)


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--far", action="store_true", help="add 64 C (stream variants only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recall-blocks", type=int, default=8, help="k of recall-ref (0: skip it)")
    ap.add_argument("--score", default="max", help="recall-ref's block score: max or mean")
    ap.add_argument("--refresh", type=int, default=1, help="recall-ref's refresh period")
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_sink import default_model
    from vllm_sink.core.config import SinkConfig
    from vllm_sink.tools.kjv import kjv_tokens

    model = default_model()
    tok = AutoTokenizer.from_pretrained(model)
    filler = kjv_tokens(model)
    prompts = Prompts(tok, filler)
    C = SinkConfig.from_section(SINK).resolve(32, 8192).capacity
    multiples = [0.5, 1, 2, 4, 8, 16] + ([64] if args.far else [])
    context = 8192  # SmolLM2-135M's max_position_embeddings: dense fits below it

    llm = make_llm(model, SINK, dtype="float32", kv_cache_memory_bytes=4 << 30, max_num_seqs=64)
    rows = []
    try:
        for mult in multiples:
            d = int(mult * C)
            trials = _trials(args, d, len(filler))
            for variant in ("dense", "stream", "pinned"):
                built = [prompts.build(k, d, off) for k, off in trials]
                if variant == "dense" and max(len(p) for p, _ in built) + 8 > context:
                    rows.append({"distance": d, "x C": mult, "variant": variant, "accuracy": None})
                    continue
                params = []
                for _, head_len in built:
                    sink = (
                        False
                        if variant == "dense"
                        else {"pin_prompt_tokens": head_len}
                        if variant == "pinned"
                        else {}
                    )
                    params.append(
                        SamplingParams(temperature=0, max_tokens=8, extra_args={"sink": sink})
                    )
                outs = llm.generate(
                    [{"prompt_token_ids": p} for p, _ in built], params, use_tqdm=False
                )
                right = sum(
                    first_number(o.outputs[0].text) == key for o, (key, _) in zip(outs, trials)
                )
                rows.append(
                    {
                        "distance": d,
                        "x C": mult,
                        "variant": variant,
                        "accuracy": right / len(trials),
                        "example": outs[0].outputs[0].text.strip()[:40],
                        "prompt tokens": len(built[0][0]),
                    }
                )
                print(table(rows[-1:], ["distance", "x C", "variant", "accuracy", "example"]))
    finally:
        shutdown(llm)
    if args.recall_blocks:
        rows += recall_reference(args, model, tok, prompts, multiples, C)

    print()
    print(table(rows, ["distance", "x C", "variant", "accuracy", "prompt tokens"]))
    save(
        "recall",
        {
            "sink": SINK,
            "capacity": C,
            "trials_per_point": args.trials,
            "model_context": context,
            "recall_ref": {
                "recall_blocks": args.recall_blocks,
                "score": args.score,
                "refresh": args.refresh,
            },
            "rows": rows,
        },
    )
    _plot(rows, C)
    return 0


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
        block_size=32,
        sink_tokens=SINK["sink_tokens"],
        window_tokens=SINK["window_tokens"],
        position_limit=8192,
    )
    rows = []
    for mult in multiples:
        d = int(mult * C)
        trials = _trials(args, d, len(prompts.filler))
        right, example = 0, ""
        for key, off in trials:
            prompt, _ = prompts.build(key, d, off)
            stream = ref.stream()
            out, _ = stream.greedy(prompt, 8, prefill_steps(ref.layout, len(prompt)))
            text = tok.decode(out)
            right += first_number(text) == key
            example = example or text.strip()[:40]
        rows.append(
            {
                "distance": d,
                "x C": mult,
                "variant": "recall-ref",
                "accuracy": right / len(trials),
                "example": example,
                "prompt tokens": len(prompt),
            }
        )
        print(table(rows[-1:], ["distance", "x C", "variant", "accuracy", "example"]))
    return rows


def _plot(rows: list[dict], C: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = (("dense", "k-o"), ("stream", "r-s"), ("pinned", "b-^"), ("recall-ref", "g-d"))
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
