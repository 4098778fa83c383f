"""Two CPU processes with the gloo backend: SSL training under DistributedDataParallel ends with
identical weights on both ranks, the ranks see disjoint data, and NT-Xent with negatives gathered
across processes equals the single-process loss (and gradient) on the global batch. Same for SwAV's
Sinkhorn codes (column sums all-reduced) and for SwAV + DeepCluster-v2 training (one memory bank,
the same k-means targets on both ranks)."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from src import io


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from src.config import load_config
    from src.ssl.objectives import nt_xent
    from src.ssl.trainer import SSLRun
    from src.ssl.views import DeviceViews
    from src.train_utils import all_reduce_mean, init_distributed, shard_rows

    info = init_distributed(torch.device("cpu"))
    assert info.world == world and info.rank == rank

    # 1) NT-Xent across processes vs the single-process global batch (B = 8 images, 2 views).
    torch.manual_seed(0)
    z_full = torch.randn(16, 8, dtype=torch.float64).float()  # view-major: [view0 of 0..7, view1 of 0..7]
    mine = torch.cat([z_full[rank * 4:(rank + 1) * 4], z_full[8 + rank * 4:8 + (rank + 1) * 4]]).clone()
    mine.requires_grad_(True)
    loss = nt_xent(mine, 2, 0.3)
    loss.backward()
    result = {"loss_mean": float(all_reduce_mean(loss)), "grad": (mine.grad / world).tolist()}

    # 2) A few DDP training steps of SimCLR + DINO on synthetic images.
    cfg = load_config(None, ["run.device=cpu", "backbone.width=4", "backbone.stem_width=8",
                             "backbone.small_stem=false",
                             "ssl.batch_size=16", "ssl.epochs=1", "ssl.proj_hidden=32", "ssl.proj_dim=16",
                             "ssl.dino_out_dim=32", "ssl.dino_bottleneck=8", "ssl.max_steps_per_epoch=3",
                             "ssl.objectives={simclr: 1.0, dino: 0.5}", "ssl.warmup_epochs=0"])
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    run = SSLRun(cfg, len(images), torch.device("cpu"))
    run.wrap()
    views = DeviceViews(cfg, images, torch.device("cpu"), run.batch, 0, 16)
    for i, (v, lv) in enumerate(views.epoch(0, run.steps)):
        run.step(v, lv, i)
    result["rows"] = shard_rows(len(images), run.batch, 0, cfg.run.seed, torch.device("cpu")).flatten().tolist()
    result["batch"] = run.batch
    state = {k: v for k, v in run.model.state_dict().items() if "running_" not in k and "num_batches" not in k}
    io.save_tensors(f"{out}/rank{rank}.safetensors", state)

    # 3) SwAV's Sinkhorn codes of this rank's half of a batch of 8.
    from src.ssl.clustering import sinkhorn_knopp

    scores = torch.rand(8, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1
    result["codes"] = sinkhorn_knopp(scores[rank * 4:(rank + 1) * 4], 0.05, 3).tolist()

    # 4) Two epochs of SwAV (with a queue) + DeepCluster-v2 under DDP.
    cfg = load_config(None, ["run.device=cpu", "backbone.width=4", "backbone.stem_width=8", "backbone.small_stem=false",
                             "ssl.batch_size=16", "ssl.epochs=2", "ssl.proj_hidden=32", "ssl.proj_dim=16",
                             "ssl.max_steps_per_epoch=2", "ssl.objectives={swav: 1.0, deepcluster: 1.0}",
                             "ssl.swav_prototypes=12", "ssl.swav_queue_length=8", "ssl.deepcluster_prototypes=[6, 4]",
                             "ssl.deepcluster_kmeans_iters=3", "ssl.warmup_epochs=0"])
    run = SSLRun(cfg, len(images), torch.device("cpu"))
    run.wrap()
    views = DeviceViews(cfg, images, torch.device("cpu"), run.batch, 0, 16)
    for epoch in range(2):
        run.model.on_epoch_start(epoch, images)
        for i, (v, lv) in enumerate(views.epoch(epoch, run.steps)):
            run.step(v, lv, epoch * run.steps + i, views.rows)
    dc = run.model.objectives["deepcluster"]
    state = {k: v for k, v in run.model.state_dict().items() if "running_" not in k and "num_batches" not in k}
    io.save_tensors(f"{out}/clustering{rank}.safetensors", {**state, "dc_memory": dc.memory,
                                                            "dc_assignments": dc.assignments})
    io.write_json(f"{out}/rank{rank}.json", result)
    dist.destroy_process_group()


def test_two_process_gloo_training(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    a, b = io.load_tensors(tmp_path / "rank0.safetensors"), io.load_tensors(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys() and any("teacher" in k for k in a) and "objectives.dino.center" in a
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between ranks"
    r0, r1 = io.read_json(tmp_path / "rank0.json"), io.read_json(tmp_path / "rank1.json")
    assert r0["batch"] == 8  # ssl.batch_size is global: 16 = 2 processes x 8
    assert not set(r0["rows"]) & set(r1["rows"]) and len(r0["rows"]) == len(set(r0["rows"])) == 32

    from src.ssl.objectives import nt_xent

    torch.manual_seed(0)
    z_full = torch.randn(16, 8, dtype=torch.float64).float().requires_grad_(True)
    ref = nt_xent(z_full, 2, 0.3)
    ref.backward()
    assert r0["loss_mean"] == pytest.approx(ref.item(), rel=1e-5) == r1["loss_mean"]
    for rank, r in enumerate((r0, r1)):
        expected = torch.cat([z_full.grad[rank * 4:(rank + 1) * 4], z_full.grad[8 + rank * 4:8 + (rank + 1) * 4]])
        assert torch.allclose(torch.tensor(r["grad"]), expected, atol=1e-6)

    from src.ssl.clustering import sinkhorn_knopp

    scores = torch.rand(8, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.allclose(torch.tensor(r0["codes"] + r1["codes"]), sinkhorn_knopp(scores, 0.05, 3), atol=1e-5)
    a, b = io.load_tensors(tmp_path / "clustering0.safetensors"), io.load_tensors(tmp_path / "clustering1.safetensors")
    assert "objectives.swav.prototypes" in a and a["dc_assignments"].shape == (2, 64)
    for key in a:
        if key != "dc_memory":
            assert torch.equal(a[key], b[key]), f"{key} differs between ranks"
    assert torch.allclose(a["dc_memory"], b["dc_memory"], atol=1e-6)  # every rank wrote the whole global batch
