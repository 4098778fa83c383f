"""src/costs.py: FLOPs against hand counts, live-memory tracking, the GPU memory and time budgets
of the shipped GPU configs, the matmul roof."""
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from src.config import load_config
from src.costs import (FULL_DATA, LiveMemory, achieved, count_flops, gpu_memory_estimate, matmul_roof,
                       ssl_step_costs, ssl_step_dtype)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_net() -> nn.Module:
    # conv 3 -> 4 channels, 3x3, padding 1 on 8x8: 8*8*4*3*3*3 = 6,912 MACs per image
    # linear 4*8*8 = 256 -> 5:                                  256*5 = 1,280 MACs per image
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5))


@pytest.mark.parametrize("input_grad", [False, True])
def test_flop_counter_matches_hand_count_on_a_tiny_conv_net(input_grad):
    """The convention: 2 FLOPs per MAC; forward 2*MAC; backward 2*MAC per weight gradient and 2*MAC
    per input gradient autograd computes (the first layer's only when its input needs one)."""
    n, conv, lin = 3, 6912, 1280
    net = tiny_net()
    x = torch.randn(n, 3, 8, 8, requires_grad=input_grad)

    def step():
        net(x).square().sum().backward()

    total, by_op = count_flops(step)
    forward = 2 * n * (conv + lin)
    backward = 2 * n * conv + 2 * n * lin * 2 + (2 * n * conv if input_grad else 0)
    assert total == forward + backward
    assert total == n * (6 * conv + 6 * lin if input_grad else 4 * conv + 6 * lin)
    assert by_op["convolution"] == 2 * n * conv and by_op["addmm"] == 2 * n * lin
    assert by_op["convolution_backward"] == 2 * n * conv * (2 if input_grad else 1)


def test_ssl_step_flops_of_resnet18_match_the_hand_count():
    """SimCLR step of the GPU recipe (ResNet-18, 32x32 stem, projector 512-2048-256), per view:
    encoder 3 x 2 x 555,417,600 MACs minus the first conv's input gradient (2 x 1,769,472),
    projector 6 x (512*2048 + 2048*256), NT-Xent similarities 6 x (V*B) x 256 (fwd + 2 grads)."""
    cfg = load_config(CONFIGS / "cifar_gpu.yaml")
    b = 64
    costs = ssl_step_costs(cfg, batch=b)
    stem = 32 * 32 * 64 * 3 * 9
    layer1 = 4 * 32 * 32 * 64 * 64 * 9
    stage = lambda s, c: s * s * c * (c // 2) * 9 + 3 * s * s * c * c * 9 + s * s * c * (c // 2)  # noqa: E731
    macs = stem + layer1 + stage(16, 128) + stage(8, 256) + stage(4, 512)
    assert macs == 555_417_600
    encoder = 6 * macs - 2 * stem
    projector = 6 * (512 * 2048 + 2048 * 256)
    nt_xent = 6 * (2 * b) * 256
    assert costs["views_per_step"] == 2 * b
    assert costs["flops_per_view"] == encoder + projector + nt_xent
    assert costs["flops_per_step"] == (encoder + projector + nt_xent) * 2 * b
    # ssl.view_size=16: every convolution sees a quarter of the pixels; the heads and the loss do not
    small = ssl_step_costs(load_config(CONFIGS / "cifar_gpu.yaml", ["ssl.view_size=16"]), batch=b)
    assert small["flops_per_view"] == encoder // 4 + projector + nt_xent


@pytest.mark.parametrize("objectives, n_local", [({"byol": 1.0}, 0), ({"dino": 1.0}, 2), ({"simsiam": 1.0}, 0),
                                                  ({"rotation": 1.0, "simclr": 1.0}, 0)])
def test_every_objective_counts_on_the_meta_device(objectives, n_local):
    cfg = load_config(None, [f"ssl.objectives={objectives}", f"ssl.n_local_crops={n_local}", "backbone.width=4",
                             "ssl.proj_hidden=32", "ssl.dino_out_dim=64"])
    costs = ssl_step_costs(cfg, batch=8)
    assert costs["views_per_step"] == 8 * (2 + n_local)
    assert costs["flops_per_view"] > 0 and costs["step_peak_bytes"] > 0


def test_live_memory_counts_storages_until_freed():
    with LiveMemory() as mem:
        a = torch.empty(1000, 1000)  # 4,000,000 B
        b = torch.empty(1000, 1000)
        view = b.view(-1)  # same storage: not counted again
        b.add_(1)  # in place: same storage
        del a
        c = torch.empty(500, 1000)  # 2,000,000 B
    assert mem.peak == 8_000_000 and mem.live == 6_000_000
    del b, view, c
    assert mem.live == 0


def test_meta_device_sees_what_a_cpu_step_allocates():
    """The estimate runs on the meta device; the same step on real CPU tensors has the same peak."""
    from src.config import BackboneCfg
    from src.models.encoder import Encoder

    peaks = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        encoder = Encoder(BackboneCfg(name="resnet18", width=4), 32).to(device)
        head = nn.Linear(encoder.dim, 10).to(device)
        with LiveMemory() as mem:
            x = torch.zeros(8, 3, 32, 32, device=device)
            head(encoder(x)).logsumexp(1).sum().backward()
        peaks.append(mem.peak)
    assert peaks[0] == peaks[1] > 0


def test_small_gpu_config_stays_under_14_gb():
    est = gpu_memory_estimate(load_config(CONFIGS / "cifar_gpu_small.yaml"))
    assert set(est) == {"ssl", "pseudo", "metric", "embed"}
    for stage, e in est.items():
        assert e["bytes"] < 14e9, (stage, e["bytes"] / 1e9)
    assert est["ssl"]["parts"]["device_images"] == FULL_DATA * 32 * 32 * 3
    assert load_config(CONFIGS / "cifar_gpu_small.yaml").bench.max_gpu_memory_gb == 14


def test_small_gpu_config_is_the_gpu_recipe_with_memory_keys_only():
    big = yaml.safe_load((CONFIGS / "cifar_gpu.yaml").read_text())
    small = yaml.safe_load((CONFIGS / "cifar_gpu_small.yaml").read_text())
    allowed = {("run", "name"), ("ssl", "embed_batch_size"), ("meta", "batch_size")}
    allowed |= {("bench", k) for k in ("budget_s", "stage_budget_s", "max_gpu_memory_gb", "ssl_probe_steps",
                                       "ssl_max_epochs", "ssl_overhead_s")}
    keys = {(s, k) for tree in (big, small) for s, sec in tree.items() for k in sec}
    differ = {(s, k) for s, k in keys if big.get(s, {}).get(k) != small.get(s, {}).get(k)}
    assert differ <= allowed, differ - allowed


def test_gpu_recipe_fits_nine_minutes_on_paper():
    """The arithmetic in configs/cifar_gpu.yaml, from counted FLOPs: at the assumed 100 TFLOP/s
    the SSL epochs fit the ssl budget after its overheads, and every budget sums to <= 540 s."""
    cfg = load_config(CONFIGS / "cifar_gpu.yaml")
    budget = cfg.bench.stage_budget_s
    setup = 28  # wheels, import check, FLOP count, roof, packing (scripts/gpu_run.sh)
    assert set(budget) == {"prepare", "ssl", "pseudo", "metric", "meta", "heads", "submit"}
    assert sum(budget.values()) <= cfg.bench.budget_s and cfg.bench.budget_s + setup <= 540
    rate = 100e12  # FLOP/s achieved, 12.7 % of the 790 TFLOP/s bf16 roof
    views = cfg.ssl.epochs * (FULL_DATA // cfg.ssl.batch_size) * cfg.ssl.batch_size * 2
    ssl_train = views * ssl_step_costs(cfg, batch=64)["flops_per_view"] / rate
    assert ssl_train + 20 <= budget["ssl"]  # 20 s: start-up, probes, embeddings
    p = cfg.pseudo
    steps = (FULL_DATA - 30) // (p.self_train_batch_size * p.unlabeled_ratio)
    fixmatch = p.rounds * p.self_train_epochs * steps * p.self_train_batch_size * (1 + 2 * p.unlabeled_ratio) * 3.34e9 / rate
    assert fixmatch + 34 <= budget["pseudo"]
    assert gpu_memory_estimate(cfg)["ssl"]["bytes"] < 139 * 2**30


def test_matmul_roof_and_achieved():
    roof = matmul_roof(torch.device("cpu"), n=64, min_seconds=0.01)
    assert roof["n"] == 64 and roof["dtype"] == "float32" and roof["repeats"] >= 3 and roof["gflops"] > 0
    assert roof["threads"] == torch.get_num_threads()
    assert achieved(2e9, 1000.0, 4000.0) == {"achieved_gflops": 2000.0, "roof_pct": 50.0}
    assert achieved(None, 1000.0, 4000.0)["achieved_gflops"] is None
    assert matmul_roof(torch.device("cpu"), n=64, min_seconds=0.01, dtype=torch.bfloat16)["dtype"] == "bfloat16"


def test_roof_dtype_is_the_ssl_steps():
    """The roof is measured in the dtype the SSL step multiplies in: bf16 under autocast, else fp32."""
    from src.runtime import resolve_cpu_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    for precision, cpu_precision, on_cpu, on_cuda in (("bf16", "bf16", torch.bfloat16, torch.bfloat16),
                                                      ("bf16", "fp32", torch.float32, torch.bfloat16),
                                                      ("fp32", "bf16", torch.float32, torch.float32)):
        cfg = load_config(None, [f"run.precision={precision}", f"ssl.cpu_precision={cpu_precision}"])
        assert (ssl_step_dtype(cfg, cpu), ssl_step_dtype(cfg, cuda)) == (on_cpu, on_cuda), (precision, cpu_precision)
    auto = load_config(None, ["ssl.cpu_precision=auto"])
    assert ssl_step_dtype(auto, cpu) == (torch.bfloat16 if resolve_cpu_bf16("auto") else torch.float32)
