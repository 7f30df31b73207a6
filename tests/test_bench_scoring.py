"""``dearli bench test-world``: the reserved world is written once and scores a checkpoint as ``dearli predict``."""

import json

from _tiny_model import tiny_checkpoint

from dearli.bench.scoring import ensure_world, score
from dearli.cli import main
from dearli.data.dataset import load_dataset
from dearli.data.synth.worlds import TEST, WORLDS, WorldSpec

SMALL = WorldSpec("small", 3, 2, 5, "this test")


def test_the_test_world_is_reserved_and_distinct():
    assert [w.name for w in WORLDS].count("test") == 1
    assert TEST.seed not in {w.seed for w in WORLDS if w is not TEST}
    assert TEST.role.startswith("reporting only")


def test_a_checkpoint_scores_as_dearli_predict_on_the_written_world(tmp_path, capsys):
    world = ensure_world(tmp_path, SMALL)
    stamp = (world / "dataset.yaml").stat().st_mtime_ns
    assert ensure_world(tmp_path, SMALL) == world and (world / "dataset.yaml").stat().st_mtime_ns == stamp
    assert len(load_dataset(world).split("val").records) == 5
    checkpoint = tiny_checkpoint(tmp_path / "run", world, ["model.inference.test_short_side=64"])
    mine = score(str(checkpoint), world, alpha_clip=0.4)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--dataset", str(world), "--out", str(tmp_path / "pred"),
                 "--alpha-clip", "0.4", "--json", "--visualize", "0"]) == 0
    predicted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mine == {k: round(predicted[k], 2) for k in ("PQ", "PQ_th", "PQ_st", "mIoU")}


def test_a_missing_checkpoint_is_refused_before_the_world_is_written(tmp_path, capsys):
    assert main(["bench", "test-world", "--checkpoint", str(tmp_path / "nope.pt"), "--workdir", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pt: checkpoint not found (--checkpoint)" in err[0]
    assert not (tmp_path / "datasets").exists()
