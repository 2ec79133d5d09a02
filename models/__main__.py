"""`python -m models list | summary NAME [--image-size N] [--num-classes K] [--arg KEY=VALUE] [--json] | table`."""
from __future__ import annotations

import argparse
import ast
import json
import sys

from .registry import list_models
from .summary import markdown_table, summarize


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. se_placement=module), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the registered model names")
    s = sub.add_parser("summary", help="parameters and forward FLOPs of one model")
    s.add_argument("name", choices=list_models(), metavar="NAME", help=f"one of: {', '.join(list_models())}")
    s.add_argument("--image-size", type=_positive, default=224)
    s.add_argument("--num-classes", type=_positive, default=1000)
    s.add_argument("--arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="model keyword argument, e.g. --arg se_placement=module (repeatable)")
    s.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    t = sub.add_parser("table", help="markdown table: measured size and cost beside published accuracy")
    t.add_argument("--image-size", type=_positive, default=224)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print("\n".join(list_models()))
    elif args.command == "table":
        print(markdown_table(args.image_size))
    else:
        s = summarize(args.name, image_size=args.image_size, num_classes=args.num_classes, **dict(args.arg))
        kw = "".join(f", {k}={v!r}" for k, v in s["model_kwargs"].items())
        print(f"{s['name']}(num_classes={s['num_classes']}{kw}) at {s['image_size']}x{s['image_size']}")
        print(f"  parameters            {s['params']:>14,}")
        print(f"  trainable parameters  {s['trainable_params']:>14,}")
        print(f"  parameters, inference {s['params_inference']:>14,}  (eval-mode forward, no aux heads)")
        print(f"  forward GFLOPs        {s['gflops']:>14.3f}  (FlopCounterMode: 2 FLOPs per multiply-add)")
        print(f"  forward GMACs         {s['gmacs']:>14.3f}  (= GFLOPs / 2, torchvision's \"GFLOPS\")")
        print(f"  aux heads             {'yes' if s['aux_heads'] else 'no':>14}")
        if args.json:
            print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
