"""Weights files given by path (the offline route): a missing or wrong file is one clear line naming the file
and the model it should hold, raised in the calling process before any worker starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dearli.caches.generators import GeneratorSpec
from dearli.cli import main
from dearli.errors import DataError, checkpoint_error
from dearli.model.backbone import check_clip_weights, create_random_clip

TINY_CLIP = "dearli-convnext-atto"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    paths = {"clip": root / "clip.pt", "wrong": root / "wrong.pt", "garbage": root / "garbage.pt",
             "sam_b": root / "sam_vit_b.pth"}
    torch.save(create_random_clip(TINY_CLIP).state_dict(), paths["clip"])
    torch.save({"x": torch.zeros(3)}, paths["wrong"])
    paths["garbage"].write_text("not a checkpoint")
    from segment_anything import sam_model_registry

    torch.save(sam_model_registry["vit_b"]().state_dict(), paths["sam_b"])
    return {k: str(v) for k, v in paths.items()}


def test_clip_weights_file_is_checked_by_name_and_shape(files):
    check_clip_weights(TINY_CLIP, files["clip"])  # the right file passes
    check_clip_weights(TINY_CLIP, "laion2b_s34b_b82k")  # an open_clip tag is open_clip's to resolve
    with pytest.raises(DataError, match=r"wrong\.pt: not the weights of open_clip dearli-convnext-atto "
                                        r"\(model\.backbone\.clip_model\): weights \d+ missing .*1 unexpected"):
        check_clip_weights(TINY_CLIP, files["wrong"])
    with pytest.raises(DataError, match=r"garbage\.pt: not the weights of .*torch cannot read the file"):
        check_clip_weights(TINY_CLIP, files["garbage"])
    with pytest.raises(DataError, match=r"missing\.pt: CLIP checkpoint file not found"):
        check_clip_weights(TINY_CLIP, files["clip"].replace("clip.pt", "missing.pt"))


def test_sam_weights_file_is_checked_against_the_sam_type(files):
    GeneratorSpec(sam_type="vit_b", sam_checkpoint=files["sam_b"]).check_weights()
    with pytest.raises(DataError, match=r"sam_vit_b\.pth: not the weights of SAM vit_l \(--sam-type\): weights "
                                        r"\d+ missing .*\d+ of another shape \(e\.g\. image_encoder\.pos_embed\)"):
        GeneratorSpec(sam_type="vit_l", sam_checkpoint=files["sam_b"]).check_weights()
    with pytest.raises(DataError, match=r"garbage\.pt: not the weights of SAM vit_h"):
        GeneratorSpec(sam_type="vit_h", sam_checkpoint=files["garbage"]).check_weights()


def test_cache_sam_refuses_a_wrong_checkpoint_in_one_line_before_ray(files, tmp_path, capsys, small_world):
    code = main(["cache", "sam", "--dataset", str(small_world), "--out", str(tmp_path / "sam"), "--sam-type", "vit_h",
                 "--sam-checkpoint", files["sam_b"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "sam_vit_b.pth: not the weights of SAM vit_h" in err[0]
    assert not (tmp_path / "sam").exists()  # nothing written


def test_load_state_dict_messages_become_counts():
    target, source = nn.Linear(2, 3), nn.Sequential(nn.Linear(2, 4))
    with pytest.raises(RuntimeError) as shape:
        target.load_state_dict(nn.Linear(2, 4).state_dict())
    with pytest.raises(RuntimeError) as names:
        target.load_state_dict(source.state_dict())
    assert str(checkpoint_error("w.pt", "M", shape.value)) == (
        "w.pt: not the weights of M: weights 2 of another shape (e.g. weight)")
    assert str(checkpoint_error("w.pt", "M", names.value)) == (
        "w.pt: not the weights of M: weights 2 missing (e.g. weight), 2 unexpected (e.g. 0.weight)")


def test_the_main_job_checks_both_weights_files_before_it_computes_anything(files, small_world, tmp_path, capsys):
    from dearli.stages.pipeline import main as job

    common = ["--workdir", str(tmp_path / "work"), "--dataset", str(small_world), "--preset", "tiny",
              "--partition", "1_4"]
    assert job([*common, "--sam-generator", "felzenszwalb", f"model.backbone.pretrained={files['wrong']}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong.pt: not the weights of open_clip dearli-convnext-atto" in err[0]
    assert job([*common, "--dry-run", "--sam-generator", "sam", "cache.sam_type=vit_h",
                f"cache.sam_checkpoint={files['sam_b']}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sam_vit_b.pth: not the weights of SAM vit_h" in err[0]
    assert not (tmp_path / "work" / "runs").exists() and not (tmp_path / "work" / "caches").exists()
