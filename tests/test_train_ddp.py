"""DDP in the Trainer: two CPU processes under torchrun (gloo) against one process, on digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from netshrink.data import digits
from netshrink.errors import ConfigError
from netshrink.models import build_model
from netshrink.train import ShardedBatchSampler, TrainConfig, Trainer, _generator

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from dataclasses import asdict
    import torch
    import torch.distributed as dist
    from netshrink.data import digits
    from netshrink.errors import ConfigError
    from netshrink.models import build_model
    from netshrink.train import TrainConfig, Trainer

    out = sys.argv[1]
    torch.set_num_threads(1)
    sp = digits(seed=0)
    res = {"world": int(os.environ["WORLD_SIZE"])}
    try:
        Trainer(build_model("mlp", in_features=64, hidden=[8]), TrainConfig(epochs=1, batch_size=33, progress=False,
                device="cpu")).fit(sp.train)
    except ConfigError as err:
        res["bad_batch"] = str(err)
    for epochs in (2, 3):  # an interrupted run (2 epochs, checkpointed by rank 0), resumed to 3 on a new model
        torch.manual_seed(0)
        model = build_model("mlp", in_features=64, hidden=[32])
        cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, schedule="constant", device="cpu", progress=False)
        r = Trainer(model, cfg).fit(sp.train, sp.val, checkpoint_dir=os.path.join(out, "ckpt"), resume=epochs == 3)
        if epochs == 2:
            res["files_after_first"] = sorted(os.listdir(os.path.join(out, "ckpt")))
    res["history"] = [asdict(h) for h in r.history]
    res["resumed_from"] = r.resumed_from
    res["weights"] = {k: v.tolist() for k, v in model.state_dict().items()}
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
    """
)


def _torchrun(tmp: Path) -> list[dict]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


def _single(epochs: int):
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[32])
    sp = digits(seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, schedule="constant", device="cpu", progress=False)
    result = Trainer(model, cfg, distributed=False).fit(sp.train, sp.val)
    return model, result


def test_two_processes_match_one_and_resume_across_ranks(tmp_path):
    model, single = _single(3)
    ranks = _torchrun(tmp_path)  # 2 epochs on 2 ranks, then resumed to 3 epochs on 2 ranks
    for r in ranks:
        assert "batch_size: 33 is not divisible by the world size 2" in r["bad_batch"]
        assert r["files_after_first"] == ["checkpoint.pt"]  # one writer, no stray temp files
        assert r["world"] == 2 and r["resumed_from"] == 2
        assert len(r["history"]) == 3
        for mine, ref in zip(r["history"], single.history):
            assert mine["train_loss"] == pytest.approx(ref.train_loss, rel=1e-4)
            assert abs(mine["val_error"] - ref.val_error) <= 1.5 / len(digits(seed=0).val)  # at most one example
        for name, ref in model.state_dict().items():
            assert torch.allclose(torch.tensor(r["weights"][name]), ref, atol=1e-4), name
    # the ranks agree exactly with each other: all-reduced metrics, synchronised weights
    assert ranks[0]["history"] == [{**h, "seconds": ranks[0]["history"][i]["seconds"]} for i, h in enumerate(ranks[1]["history"])]
    assert ranks[0]["weights"] == ranks[1]["weights"]


@pytest.mark.parametrize("n, batch, world", [(1257, 32, 2), (10, 4, 2), (9, 4, 4), (5, 6, 3)])
def test_sharded_batches_partition_the_single_process_batches(n, batch, world):
    seed, epoch = 3, 2
    perm = torch.randperm(n, generator=_generator(seed, epoch)).tolist()
    single = [perm[i:i + batch] for i in range(0, n, batch)]
    samplers = [ShardedBatchSampler(n, batch, r, world, seed) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    assert all(len(b) == len(single) == len(s) for b, s in zip(per_rank, samplers))
    for step, full in enumerate(single):
        shares = [s.share(step) for s in samplers]
        real = [b[step] for b, (k, _) in zip(per_rank, shares) if k > 0]
        assert sorted(i for b in real for i in b) == sorted(full)
        assert sum(k for k, _ in shares) == len(full)
        # the average over ranks of the scaled per-rank means is the single-process mean
        assert sum(scale for _, scale in shares) / world == pytest.approx(1.0)


def test_asking_for_ddp_without_a_launcher_is_a_clear_error(monkeypatch):
    for var in ("WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    model = build_model("mlp", in_features=64, hidden=[8])
    with pytest.raises(ConfigError, match="distributed: .*torchrun"):
        Trainer(model, TrainConfig(epochs=1, progress=False, device="cpu"), distributed=True).fit(digits(seed=0).train)
