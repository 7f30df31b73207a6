"""One rule each for what the Ray stages used to decide in several places: the device, the batch split."""

from __future__ import annotations

import os

import pytest
import torch

from dearli import runtime
from dearli.config import load_config
from dearli.device import resolve_device
from dearli.errors import ConfigError
from dearli.runtime import gpu_share
from dearli.stages import costs, ray_train


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'gpu7' is not a device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:1' asked for, but no CUDA device"):
            resolve_device("cuda:1")


def test_train_device_reaches_the_ray_stages():
    # train.device used to be ignored by the Ray stages: they always took Ray Train's device.
    assert ray_train.worker_device(load_config("tiny", ["train.device=cpu"])) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            ray_train.worker_device(load_config("tiny", ["train.device=cuda"]))


def test_one_batch_split_for_every_stage():
    # Rounded up: 16 on 3 workers is 6 each (18 a step), never 5 (15); at least one image per worker.
    assert [ray_train.per_rank(16, w) for w in (1, 2, 3, 4, 32)] == [16, 8, 6, 4, 1]
    assert ray_train.batch_note(16, 4) == ""
    assert ray_train.batch_note(16, 3) == " (effective batch 18: 6 per worker on 3 workers)"
    assert ray_train.batch_note(2, 4, "labeled batch") == " (effective labeled batch 4: 1 per worker on 4 workers)"


def test_gpu_share_fits_every_user_on_a_gpu():
    assert [gpu_share(g, 2) for g in (0, 0.5, 1, 2, 4)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert gpu_share(2, 3) == 0.5 and gpu_share(1, 3) == pytest.approx(1 / 3) and gpu_share(3, 0) == 0.0
    for gpus in range(1, 5):  # the fractions of one GPU never add up to more than that GPU
        for users in range(1, 9):
            share = gpu_share(gpus, users)
            assert share * users <= gpus * 1.0001 and int(1 / share + 1e-9) * gpus >= users


def test_mean_teacher_shares_one_gpu_between_student_and_teacher():
    # The paper's single-GPU setting: one Train worker and one teacher actor wanting a GPU each would leave the
    # teacher unplaced and the student waiting for labels forever; they get half a GPU each.
    cfg = load_config("tiny")
    assert (cfg.train.num_workers, cfg.ssl.teacher_actors, cfg.ssl.teacher_gpus) == (1, 1, -1)
    assert ray_train.ssl_gpus(cfg, 1) == (0.5, 0.5)
    assert ray_train.ssl_gpus(cfg, 2) == (1.0, 1.0)
    assert ray_train.ssl_gpus(cfg, 0) == (0.0, 0.0)
    assert ray_train.ssl_gpus(load_config("tiny", ["train.num_workers=2", "ssl.teacher_actors=2"]), 2) == (0.5, 0.5)
    assert ray_train.ssl_gpus(load_config("tiny", ["train.device=cpu"]), 1) == (0.0, 1.0)  # the teacher alone
    assert ray_train.ssl_gpus(load_config("tiny", ["ssl.teacher_gpus=0"]), 1) == (1.0, 0.0)  # as the user set it


def test_stage_costs_carry_gpu_memory_where_workers_recorded_it(tmp_path):
    from dearli.stages.pipeline_steps import COSTS, cost_lines

    costs.record_cost(tmp_path, "ssl", 0, peak_rss_mb=900.0, teacher_peak_rss_mb=700.0, gpu_peak_mb=5000.0,
                       teacher_gpu_peak_mb=3000.0)
    costs.record_cost(tmp_path, "ssl", 1, peak_rss_mb=950.0, gpu_peak_mb=5200.0)
    peaks = costs.worker_peaks(tmp_path)
    assert peaks == {"worker_peak_mb": 950.0, "teacher_peak_mb": 700.0, "worker_gpu_peak_mb": 5200.0,
                     "teacher_gpu_peak_mb": 3000.0}
    [line] = cost_lines({COSTS: {"ssl": {"seconds": 12.0, "driver_peak_mb": 500.0, **peaks}}})
    assert line == ("cost of ssl: 12 s; peak memory: driver 500 MiB, Train worker 950 MiB, teacher actor 700 MiB, "
                    "GPU of a Train worker 5200 MiB, GPU of a teacher actor 3000 MiB")
    if not torch.cuda.is_available():
        assert costs.peak_gpu_mb() == {}  # a CPU worker records no GPU figure


def test_parquet_footer_pool_follows_the_number_of_files(monkeypatch):
    # Ray Data starts 32 footer actors for any read and gives work to one per batch of 10 files.
    monkeypatch.delenv(runtime.PARQUET_FOOTER_ACTORS_ENV, raising=False)
    monkeypatch.delenv(runtime.PARQUET_FOOTER_BATCH_ENV, raising=False)
    assert [runtime.parquet_footer_actors(n) for n in (0, 1, 10, 11, 16, 320, 5000)] == [1, 1, 1, 2, 2, 32, 32]
    monkeypatch.setenv(runtime.PARQUET_FOOTER_ACTORS_ENV, "2")  # a local instance, or the user's own cap
    assert [runtime.parquet_footer_actors(n) for n in (5, 16, 5000)] == [1, 2, 2]
    monkeypatch.setenv(runtime.PARQUET_FOOTER_BATCH_ENV, "4")
    monkeypatch.setenv(runtime.PARQUET_FOOTER_ACTORS_ENV, "32")
    assert runtime.parquet_footer_actors(16) == 4
    monkeypatch.setenv(runtime.PARQUET_FOOTER_ACTORS_ENV, "lots")  # a bad setting is named, in one line
    with pytest.raises(ConfigError, match="^RAY_DATA_PARQUET_FOOTER_NUM_ACTORS: must be a positive whole number, "
                                          "not 'lots'$"):
        runtime.parquet_footer_actors(16)


def test_a_parquet_read_starts_only_the_footer_actors_it_uses(ray_local, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def footer_actors() -> int:  # every actor the GCS knows, dead ones too (the pool is killed after listing)
        return sum(a["ActorClassName"] == "FooterReader" for a in ray_local._private.state.actors().values())

    monkeypatch.setenv(runtime.PARQUET_FOOTER_ACTORS_ENV, "32")  # as on a cluster: Ray's default
    files = []
    for i in range(16):
        files.append(str(tmp_path / f"part-{i:03d}.parquet"))
        pq.write_table(pa.table({"stem": [f"img{i}"]}), files[-1])
    before = footer_actors()
    rows = runtime.read_parquet(files).take_all()
    assert sorted(r["stem"] for r in rows) == sorted(f"img{i}" for i in range(16))
    assert footer_actors() - before == 2
    assert os.environ[runtime.PARQUET_FOOTER_ACTORS_ENV] == "32"  # the setting is the user's again
