"""The supervised loop end to end on a small synthetic world: checkpoints, resume, evaluation output."""

import json

import numpy as np
import pytest
from PIL import Image

from dearli.cli import main
from dearli.data.coco_format import rgb2id
from dearli.data.dataset import load_dataset
from dearli.training.checkpoint import load_checkpoint

FAST = ["model.loss.num_points=256", "data.crop_size=64", "model.inference.test_short_side=64",
        "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2"]
SYNTH = {"num_images": 16, "seed": 3, "num_val": 4}  # conftest's synth fixture


def test_train_checkpoints_evaluates_and_resumes(synth, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--dataset", str(synth), "--partition", "1_4", "--out", str(run), *FAST]
    assert main([*args, "train.max_steps=4", "train.eval_every=2"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002.pt", "step_0000004.pt"]
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["gt_cache", "step_0000002", "step_0000004"]
    assert "data:" in (run / "config.yaml").read_text()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3, 4]
    assert [s["step"] for s in steps if "eval" in s] == [2, 4]
    assert all(np.isfinite(s["loss"]) for s in steps if "loss" in s)

    # evaluation wrote one valid panoptic PNG per validation image, with ids matching the JSON
    eval_dir = run / "eval" / "step_0000004"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "mIoU_pan"}
    pred = json.loads((eval_dir / "panoptic.json").read_text())
    assert len(pred["annotations"]) == 4
    for ann in pred["annotations"]:
        ids = set(np.unique(rgb2id(np.asarray(Image.open(eval_dir / "panoptic" / ann["file_name"])))).tolist())
        assert ids - {0} == {s["id"] for s in ann["segments_info"]}
    # mIoU_pan is the number `dearli evaluate --semseg` gives for the same predictions (printed as mIoU_pan)
    val = load_dataset(synth).split("val")
    capsys.readouterr()
    assert main(["evaluate", "--gt-json", str(val.json_path), "--gt-dir", str(val.records[0].panoptic_path.parent),
                 "--pred-json", str(eval_dir / "panoptic.json"), "--pred-dir", str(eval_dir / "panoptic"),
                 "--semseg", "--json", "--workers", "1", "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert 100 * scored["semseg_pan"]["miou"] == pytest.approx(metrics["summary"]["mIoU_pan"])
    assert 100 * scored["All"]["pq"] == pytest.approx(metrics["summary"]["PQ"])

    # a used run directory is never silently reused
    assert main([*args, "train.max_steps=6"]) == 1
    assert "not empty" in capsys.readouterr().err
    # a config that differs from the saved one is refused too, even with --resume
    assert main([*args, "--resume", "train.max_steps=6", "optim.lr=0.5"]) == 1
    assert "different configuration" in capsys.readouterr().err
    # resuming the finished run keeps its evaluation instead of failing on the existing predictions
    assert main([*args, "--resume", "train.max_steps=4", "train.eval_every=2"]) == 0
    assert "was evaluated before" in capsys.readouterr().out


def test_resume_continues_from_the_last_checkpoint(synth, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--dataset", str(synth), "--out", str(run), "--no-eval", "train.max_steps=4", *FAST]
    assert main(args) == 0
    first = load_checkpoint(run / "checkpoints" / "step_0000004.pt")
    # resume of a finished run changes nothing
    assert main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    again = load_checkpoint(run / "checkpoints" / "step_0000004.pt")
    for key, value in first["model"].items():
        assert np.array_equal(value.numpy(), again["model"][key].numpy()), key
    assert first["config"].train.max_steps == 4

    # the checkpoint predicts and scores a split on its own, and never writes over earlier predictions
    pred = ["predict", "--checkpoint", str(run / "checkpoints" / "step_0000004.pt"), "--dataset", str(synth),
            "--out", str(tmp_path / "pred"), "--alpha-clip", "0.4", "--json"]
    capsys.readouterr()
    assert main(pred) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "mIoU_pan"}
    assert all(0.0 <= v <= 100.0 for v in summary.values())
    assert main(pred) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_bad_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_checkpoint_restores_identical_predictions(tmp_path):
    """A restored random-weight model predicts exactly what the saved one did (text embeddings included)."""
    import torch

    from dearli.config import load_config
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.training.checkpoint import restore, save_checkpoint

    cfg = load_config("tiny")
    names = [["red circle"], ["grass", "lawn"], ["sky"]]
    torch.manual_seed(0)
    saved = build_m2f_lang(cfg.model, names).eval()
    torch.manual_seed(1)
    fresh = build_m2f_lang(cfg.model, names).eval()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        expected = saved(images)["pred_logits"]
        assert not torch.allclose(fresh(images)["pred_logits"], expected)
        restore(fresh, load_checkpoint(save_checkpoint(tmp_path, 1, saved, cfg)))
        torch.testing.assert_close(fresh(images)["pred_logits"], expected)
