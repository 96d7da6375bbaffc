"""Parameter and FLOP counts of every registered backbone at the MedMNIST input sizes.

    python benchmarks/profile_backbones.py --sizes 28 64 --out benchmarks/results/profiles.json

FLOPs are forward FLOPs for one image (multiply-add = 2) from ``torch.utils.flop_counter``, in eval mode (the
equivariant filters already expanded). Equivariant backbones are listed with the default group (D4) and with C8.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from eqlightning.models import backbone_entry, create_backbone, list_backbones, profile_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)

    rows = []
    for name in list_backbones(dims=2):
        variants = [{"group": "D4"}, {"group": "C8"}] if backbone_entry(name).equivariant else [{}]
        for options in variants:
            for size in args.sizes:
                model = create_backbone(name, in_channels=args.in_channels, num_classes=args.num_classes,
                                        input_size=size, **options)
                p = profile_backbone(model, size, args.in_channels)
                rows.append({"backbone": name, **options, "input_size": size, "parameters": p.parameters,
                             "gflops": round(p.flops / 1e9, 4)})
                print(f"{name:16s} {options.get('group', '-'):4s} {size:4d}px  {p.parameters / 1e6:8.3f} M params"
                      f"  {p.flops / 1e9:8.3f} GFLOPs")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.platform(), "torch": torch.__version__, "in_channels": args.in_channels}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
