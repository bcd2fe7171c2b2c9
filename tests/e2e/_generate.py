"""Run greedy generation in a fresh process; print the token ids as JSON (last line)."""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    args = json.loads(sys.argv[1])
    llm = LLM(args["model"], **args["engine"])
    outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]],
                        SamplingParams(temperature=0, max_tokens=args["max_tokens"],
                                       ignore_eos=True), use_tqdm=False)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
