"""Run greedy generation in a fresh process; print the token ids as JSON (last line),
with ``top_logprobs`` each token's top log-probs beside them."""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    args = json.loads(sys.argv[1])
    k = args.get("top_logprobs")
    llm = LLM(args["model"], **args["engine"])
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in args["prompts"]],
        SamplingParams(temperature=0, max_tokens=args["max_tokens"], logprobs=k, ignore_eos=True),
        use_tqdm=False,
    )
    result = [list(o.outputs[0].token_ids) for o in outs]
    if k is not None:
        result = [
            (toks, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for toks, o in zip(result, outs)
        ]
    print("RESULT " + json.dumps(result), flush=True)
