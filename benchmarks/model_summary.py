"""Parameter counts and forward FLOPs of every registered model, one JSON object per line.

    python -m benchmarks.model_summary [--image-size 224] [--num-classes 1000]

FLOPs: torch.utils.flop_counter.FlopCounterMode, eval mode, one image, meta device (shape arithmetic, so
the numbers do not depend on the hardware); 2 FLOPs per multiply-add, `gmacs` = half. The first line
records the versions that produced the rest.
"""
from __future__ import annotations

import argparse
import json
import platform

import timm
import torch
import torchvision

from models import list_models, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                      "torchvision": torchvision.__version__, "timm": timm.__version__}))
    variants = [(name, {}) for name in list_models()] + [("se_googlenet", {"se_placement": "module"})]
    for name, kwargs in variants:
        print(json.dumps(summarize(name, image_size=args.image_size, num_classes=args.num_classes, **kwargs)))


if __name__ == "__main__":
    main()
