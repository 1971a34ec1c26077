"""Issue 10's findings, one test each: every bad value is refused where it is read,
with one line naming the field, before anything is planned, built or started; the
planner and the simulator refuse sizes past their stated limits."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from edgepool.cli.main import main

CORPUS = Path(__file__).resolve().parents[2] / "src" / "edgepool" / "data" / "corpus.txt"
POOL = "devices:\n  - {name: a, kind: host-cpu}\n  - {name: b, kind: jetson-nano}\n"
JOB = {"model": {"family": "gpt", "size": "tiny"}, "data": {"path": str(CORPUS)},
       "train": {"global_batch": 8, "seq_len": 32, "steps": 2}, "parallelism": "dp"}


def _job(**parts) -> dict:
    job = json.loads(json.dumps(JOB))
    for section, fields in parts.items():
        if isinstance(job.get(section), dict) and isinstance(fields, dict):
            job[section].update(fields)
        else:
            job[section] = fields
    return job


def _run(tmp_path, capsys, cmd: str, pool: str = POOL, job: dict | None = None, plan: dict | str | None = None,
         extra: tuple[str, ...] = ()) -> tuple[int, str]:
    (tmp_path / "pool.yaml").write_text(pool)
    (tmp_path / "job.json").write_text(json.dumps(job or JOB))
    argv = [cmd, "--pool", str(tmp_path / "pool.yaml"), "--job", str(tmp_path / "job.json")]
    if plan is not None:
        (tmp_path / "plan.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
        argv += ["--plan", str(tmp_path / "plan.json")]
    if cmd == "train":
        argv += ["--out", str(tmp_path / "out")]
    rc = main(argv + list(extra))
    return rc, capsys.readouterr().err.strip()


def _one_line(rc: int, err: str, expect: str) -> None:
    assert rc == 2, err
    assert expect in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def _devices(n: int, extra: str = "") -> str:
    return "devices:\n" + "".join(f"  - {{name: d{i}, kind: host-cpu{extra}}}\n" for i in range(n))


BAD_POOLS = {
    "bandwidth inf": ("network: {bandwidth_mbps: .inf}\n" + POOL, "network.bandwidth_mbps: expected a finite number, got inf"),
    "bandwidth 1e308": ("network: {bandwidth_mbps: 1.0e308}\n" + POOL, "less than or equal to 400000"),
    "compute_scale tiny": ("devices:\n  - {name: a, kind: host-cpu, compute_scale: 1.0e-12}\n", "greater than or equal to 0.001"),
    "compute_scale inf": ("devices:\n  - {name: a, kind: host-cpu, compute_scale: .inf}\n", "expected a finite number"),
    "nan latency": ("network: {latency_ms: .nan}\n" + POOL, "expected a finite number"),
    "thousands of devices": (_devices(2000), "limit of 64"),
    "memory_gb true": ("devices:\n  - {name: a, kind: host-cpu, memory_gb: true}\n", "expected a number, got true"),
    "name ..": ("devices:\n  - {name: '..', kind: host-cpu}\n", "'..' is not a safe name"),
    "name .": ("devices:\n  - {name: '.', kind: host-cpu}\n", "'.' is not a safe name"),
    "name -rf": ("devices:\n  - {name: -rf, kind: host-cpu}\n", "'-rf' is not a safe name"),
    "host with a shell": ("devices:\n  - {name: a, kind: host-cpu, host: 'x;reboot'}\n", "neither local"),
    "duplicate key": (POOL + "devices: []\n", "key 'devices' is given twice"),
    "deep nesting": ("name: " + "[" * 40 + "]" * 40 + "\n" + POOL, "nested more than 16 levels"),
    "very deep nesting": ("name: " + "[" * 5000 + "]" * 5000 + "\n" + POOL, "nested too deeply"),
}


def _pretrained(tmp_path: Path, **fields) -> str:
    d = tmp_path / "hf"
    d.mkdir()
    cfg = {"model_type": "gpt2", "vocab_size": 300, "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 64}
    (d / "config.json").write_text(json.dumps({**cfg, **fields}))
    return str(d)


BAD_JOBS = {
    "global_batch 1e9": (dict(train={"global_batch": 1_000_000_000}), "less than or equal to 65536"),
    "hidden 1e12": (dict(model={"hidden": 10**12}), "model.hidden: Input should be less than or equal to 65536"),
    "seq_len 1e9": (dict(train={"seq_len": 10**9}), "train.seq_len: Input should be less than or equal to 131072"),
    "num_layers 100000": (dict(model={"num_layers": 100_000}), "less than or equal to 256"),
    "lr inf": (dict(train={"lr": float("inf")}), "train.lr: expected a finite number"),
    "lr 100": (dict(train={"lr": 100}), "train.lr: Input should be less than or equal to 10"),
    "timeout inf": (dict(train={"timeout_s": float("inf")}), "train.timeout_s: expected a finite"),
    "timeout 1e15": (dict(train={"timeout_s": 1e15}), "less than or equal to 86400"),
    "timeout 1e-9": (dict(train={"timeout_s": 1e-9}), "greater than or equal to 1"),
    "seed -1": (dict(train={"seed": -1}), "train.seed: Input should be greater than or equal to 0"),
    "steps true": (dict(train={"steps": True}), "expected a number, got true"),
    "data paths ..": (dict(data={"paths": {"..": str(CORPUS)}}), "'..' is not a safe name"),
    "micro-batches": (dict(parallelism={"mode": "pp", "num_microbatches": 100_000}), "less than or equal to 256"),
    "empty size": (dict(model={"family": "gpt", "size": ""}), "model.size: unknown model size ''"),  # fuzz find
    "too big for the pool": (dict(model={"num_layers": 256, "hidden": 16384, "num_heads": 128, "ffn": 65536}),
                             "GB in fp32 but the pool's devices hold"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_values_are_refused_before_start(tmp_path, capsys, case):
    parts, expect = BAD_JOBS[case]
    rc, err = _run(tmp_path, capsys, "train", job=_job(**parts))
    _one_line(rc, err, expect)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields,expect", [
    ({"n_embd": "64"}, "not a whole number"),
    ({"n_layer": 2.5}, "model num_layers 2.5 is not a whole number"),
    ({"n_head": 0}, "model num_heads 0 is not a whole number"),
    ({"n_layer": 100000}, "model num_layers 100000"),
    ({"rope_theta": "x", "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
      "intermediate_size": 128}, "the config.json is damaged"),
])
def test_a_pretrained_config_with_wrong_types_is_one_line(tmp_path, capsys, fields, expect):
    rc, err = _run(tmp_path, capsys, "plan", job=_job(model={"pretrained": _pretrained(tmp_path, **fields)}))
    _one_line(rc, err, expect)


NAN_SHARES = '{"num_layers": 4, "stages": [{"layers": [0, 4], "devices": ["a", "b"], "shares": [NaN, 1]}]}'
INF_SHARES = '{"num_layers": 4, "stages": [{"layers": [0, 4], "devices": ["a", "b"], "shares": [Infinity, 1]}]}'
BAD_PLANS = {
    "NaN share": (NAN_SHARES, "expected a finite number"),
    "inf share": (INF_SHARES, "expected a finite number"),
    "unknown power mode": ({"num_layers": 4, "power_modes": {"b": "turbo"},
                            "stages": [{"layers": [0, 4], "devices": ["a", "b"]}]}, "unknown power_mode 'turbo'"),
    "unsafe device": ({"num_layers": 4, "stages": [{"layers": [0, 4], "devices": ["../a"]}]}, "not a safe name"),
    "micro-batches": ({"num_layers": 4, "num_microbatches": 4096, "stages": [{"layers": [0, 4], "devices": ["a"]}]},
                      "less than or equal to 256"),
}


BAD_FILES = [("pool", cmd, case) for case in BAD_POOLS for cmd in ("plan", "train")] + \
    [("plan", cmd, case) for case in BAD_PLANS for cmd in ("simulate", "train")]


@pytest.mark.parametrize("what,cmd,case", BAD_FILES, ids=[f"{w}-{c}-{k}" for w, c, k in BAD_FILES])
def test_bad_pool_and_plan_values_are_one_line(tmp_path, capsys, what, cmd, case):
    value, expect = (BAD_POOLS if what == "pool" else BAD_PLANS)[case]
    rc, err = _run(tmp_path, capsys, cmd, **{what: value})
    _one_line(rc, err, expect)
    assert not (tmp_path / "out").exists()  # nothing started, no folder made


# -- the planner and the simulator end, and say where their limits are ---------------
def test_the_planner_refuses_a_problem_past_its_table_limit(tmp_path, capsys):
    rc, err = _run(tmp_path, capsys, "plan", pool=_devices(64), job=_job(model={"num_layers": 256}))
    _one_line(rc, err, "past the planner's limit of N^2 (L+1)^2")


def test_the_planner_stops_at_its_work_budget(tmp_path, capsys, monkeypatch):
    from edgepool.planner import search

    monkeypatch.setattr(search, "MAX_SEARCH_CELLS", 10_000)
    pool = "devices:\n" + "".join(f"  - {{name: d{i}, kind: host-cpu, compute_scale: {1 + i}}}\n" for i in range(6))
    rc, err = _run(tmp_path, capsys, "plan", pool=pool, job=_job(model={"num_layers": 16}))
    _one_line(rc, err, "passed its work limit of 1e+04 table cells")


def test_the_simulator_refuses_a_plan_past_its_limit(tmp_path, capsys):
    plan = {"num_layers": 32, "num_microbatches": 256, "schedule": "gpipe",
            "stages": [{"layers": [i, i + 1], "devices": [f"d{i}"]} for i in range(32)]}
    job = _job(model={"num_layers": 32}, train={"global_batch": 256})
    rc, err = _run(tmp_path, capsys, "simulate", pool=_devices(32), job=job, plan=plan)
    _one_line(rc, err, "past the simulator's limit of 4096")


def test_the_planner_prices_a_huge_batch_without_hanging(tmp_path, capsys):
    # 65536 samples: at most 256 micro-batch counts are searched; the plan comes back.
    rc, err = _run(tmp_path, capsys, "plan", job=_job(train={"global_batch": 65536}))
    assert rc == 0, err


# -- data, checked per device before any process starts ------------------------------
def test_bad_data_files_are_one_line_each_before_start(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    (tmp_path / "short.txt").write_text("hello")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    pool = "devices:\n" + "".join(f"  - {{name: {n}, kind: host-cpu}}\n" for n in ("a", "b", "c", "d"))
    paths = {"a": "empty.txt", "b": "binary.txt", "c": "short.txt", "d": "bad.jsonl"}
    job = _job(data={"path": None, "paths": {k: str(tmp_path / v) for k, v in paths.items()}})
    del job["data"]["path"]
    plan = {"num_layers": 4, "stages": [{"layers": [0, 4], "devices": ["a", "b", "c", "d"]}]}  # all own data
    rc, err = _run(tmp_path, capsys, "train", pool=pool, job=job, plan=plan)
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 4 and "Traceback" not in err, err
    assert "device 'a'" in lines[0] and "has 0 tokens" in lines[0]
    assert "device 'b'" in lines[1] and "binary" in lines[1]
    assert "device 'c'" in lines[2] and "fewer than one sample" in lines[2]
    assert "device 'd'" in lines[3] and "no text field 'text'" in lines[3]
    assert not (tmp_path / "out").exists()


# -- the run folder ------------------------------------------------------------------
def test_an_out_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out, expect in [(tmp_path / "afile", "is a file, not a folder"), (tmp_path / "afile" / "sub", "cannot be made")]:
        (tmp_path / "pool.yaml").write_text(POOL)
        (tmp_path / "job.json").write_text(json.dumps(JOB))
        rc = main(["train", "--pool", str(tmp_path / "pool.yaml"), "--job", str(tmp_path / "job.json"),
                   "--out", str(out)])
        _one_line(rc, capsys.readouterr().err.strip(), expect)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; the permission check cannot fail as root")
def test_an_out_without_write_permission_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    (tmp_path / "pool.yaml").write_text(POOL)
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    rc = main(["train", "--pool", str(tmp_path / "pool.yaml"), "--job", str(tmp_path / "job.json"), "--out", str(ro)])
    _one_line(rc, capsys.readouterr().err.strip(), "is not writable")


def test_a_stale_lock_is_taken_over_and_logged(tmp_path):
    from edgepool.launch import folder

    out = tmp_path / "run"
    out.mkdir()
    (out / folder.LOCK).write_text("pid 999999 (edgepool train, since yesterday)\n")  # its process is gone
    said = []
    with folder.hold(out, "edgepool train", log=said.append):
        assert f"pid {os.getpid()}" in (out / folder.LOCK).read_text()
    assert said and "took over the lock" in said[0] and "pid 999999" in said[0]


# -- printed commands and addresses --------------------------------------------------
@pytest.mark.parametrize("master,expect", [(":29500", "neither an IP address nor a host name"),
                                           ("10.0.0.1:0", "the port must be 1-65535"),
                                           ("10.0.0.1", "must be ADDR:PORT"),
                                           ("a;b:29500", "neither an IP address")])
def test_a_bad_master_is_refused(tmp_path, capsys, master, expect):
    rc, err = _run(tmp_path, capsys, "hosts", extra=("--out", str(tmp_path / "o"), "--master", master))
    _one_line(rc, err, expect)


def test_hosts_quotes_every_argument(tmp_path, capsys):
    rc, err = _run(tmp_path, capsys, "hosts", extra=("--out", str(tmp_path / "o"), "--master", "[fe80::1]:29500",
                                                     "--iface", "eth0;rm"))
    _one_line(rc, err, "not a network interface name")
    out_dir = tmp_path / "dir with space"
    rc = main(["hosts", "--pool", str(tmp_path / "pool.yaml"), "--job", str(tmp_path / "job.json"), "--out",
               str(out_dir), "--master", "[fe80::1]:29500", "--iface", "eth0"])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0
    cmds = [line for line in printed if not line.startswith("#")]
    assert len(cmds) == 2
    for rank, line in enumerate(cmds):
        argv = shlex.split(line)  # one argument each, spaces and all
        assert argv[:3] == ["env", "GLOO_SOCKET_IFNAME=eth0", "OMP_NUM_THREADS=1"]
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--master-addr") + 1] == "fe80::1"
        assert argv[-1] == str(out_dir / "run.json")
