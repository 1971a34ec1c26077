"""``edgepool export --run DIR --out HF_DIR [--merge] [--step N]``: a run's trained model
as a Hugging Face folder (``runtime.export``, ``models.export``)."""

from __future__ import annotations

import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="the run's folder (the --out of `edgepool train`)")
    parser.add_argument("--out", required=True, metavar="HF_DIR", help="the Hugging Face folder to write (new or empty)")
    parser.add_argument("--merge", action="store_true",
                        help="fold LoRA adapters into the weights (default: write them beside the base in peft's "
                             "format); no effect on a run without LoRA")
    parser.add_argument("--step", type=int, metavar="N", help="export the checkpoint of step N (default: the newest good one)")


def run(args: argparse.Namespace) -> int:
    from edgepool.runtime.export import export_run

    written, step, filled = export_run(args.run, args.out, merge=args.merge, step=args.step)
    what = [f"{len(written.files)} files"]
    if written.merged:
        what.append(f"{written.merged} LoRA adapters merged")
    if written.adapters:
        what.append(f"{written.adapters} LoRA adapters in peft's format (adapter_config.json, adapter_model.safetensors)")
    if written.tied:
        what.append("tied output embedding")
    if filled:
        what.append(f"{len(filled)} frozen tensors from the run's initial state")
    if not written.tokenizer:
        what.append("no tokenizer files (the run has no pretrained tokenizer)")
    print(f"exported step {step} of {args.run} to {written.out} ({'; '.join(what)})")
    return 0
