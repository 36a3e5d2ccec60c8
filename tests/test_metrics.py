from __future__ import annotations

import math
import textwrap

import pytest
import torch

from ovseg_fast.metrics import ConfusionMatrix, confusion_matrix, harmonic_mean, metrics_from_confusion
from tests.helpers import run_gloo_workers

# A hand-worked example, C = 3 (+ a 4th class that occurs nowhere):
#   target [[0, 0, 1], [1, 2, 255]]     counted pixels (t, p): (0,0) (0,1) (1,1) (1,1) (2,0)
#   pred   [[0, 1, 1], [1, 0,   2]]     the ignored pixel's prediction is not looked at
# TP = (1, 2, 0); labelled = (2, 2, 1); predicted = (2, 3, 0); union = (3, 3, 1)
# IoU = (1/3, 2/3, 0, NaN), mIoU = 1/3, pixel accuracy 3/5, class accuracy (1/2, 1, 0, NaN).
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def test_hand_computed_example():
    cm = confusion_matrix(PRED, TARGET, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    assert torch.equal(cm, expected)
    m = metrics_from_confusion(cm)
    assert m.pixels == 5
    assert m.pixel_accuracy == pytest.approx(3 / 5)
    assert m.iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(m.iou[3])
    assert m.miou == pytest.approx(1 / 3)  # the class in neither labels nor predictions is left out
    assert m.accuracy[:3].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert m.mean_accuracy == pytest.approx(0.5)
    assert m.hiou is None


def test_zero_shot_split_hand_computed():
    m = metrics_from_confusion(confusion_matrix(PRED, TARGET, 4), seen=[0, 2], unseen=[1, 3])
    assert m.seen_miou == pytest.approx((1 / 3 + 0) / 2)
    assert m.unseen_miou == pytest.approx(2 / 3)  # class 3 (NaN) left out
    assert m.hiou == pytest.approx(4 / 15)  # 2 (1/6)(2/3) / (1/6 + 2/3)
    d = m.as_dict(["a", "b", "c", "d"])
    assert d["hiou"] == pytest.approx(4 / 15) and d["iou"]["b"] == pytest.approx(2 / 3)


def test_harmonic_mean_edge_cases():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(math.nan, 0.5))
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)


def _random_batches(n=4, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        target = torch.randint(0, c, (2, 7, 9), generator=gen)
        target[torch.rand(2, 7, 9, generator=gen) < 0.1] = 255
        scores = torch.randn(2, c, 7, 9, generator=gen)
        out.append((scores, target))
    return out


def test_streaming_equals_one_batch_and_loop_count():
    batches = _random_batches()
    stream = ConfusionMatrix(5)
    for scores, target in batches:
        stream.update(scores, target)  # scores: argmax over C
    whole = confusion_matrix(torch.cat([s for s, _ in batches]), torch.cat([t for _, t in batches]), 5)
    assert torch.equal(stream.total(), whole)
    loop = torch.zeros(5, 5, dtype=torch.int64)
    for scores, target in batches:
        for t, p in zip(target.flatten().tolist(), scores.argmax(1).flatten().tolist()):
            if t != 255:
                loop[t, p] += 1
    assert torch.equal(whole, loop)
    m = stream.compute()
    assert m.pixels == int((torch.cat([t for _, t in batches]) != 255).sum())
    stream.reset()
    assert stream.compute().pixels == 0 and math.isnan(stream.compute().miou)


def test_ignore_index_and_int_dtypes():
    target = TARGET.clone()
    target[target == 255] = -1
    cm = confusion_matrix(PRED.to(torch.uint8), target.int(), 4, ignore_index=-1)
    assert torch.equal(cm, confusion_matrix(PRED, TARGET, 4))


def test_input_errors():
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="seen and unseen must be given together"):
        ConfusionMatrix(4, seen=[0, 1])
    with pytest.raises(ValueError, match="seen and unseen share classes"):
        ConfusionMatrix(4, seen=[0, 1], unseen=[1, 2])
    with pytest.raises(ValueError, match=r"unseen holds class 7, outside \[0, 4\)"):
        ConfusionMatrix(4, seen=[0, 1], unseen=[7])
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"target must hold labels in \[0, 3\) or ignore_index=255, got 3"):
        cm.update(PRED, TARGET + (TARGET == 0).long() * 3)
    with pytest.raises(ValueError, match=r"pred must hold classes in \[0, 3\), got 4"):
        cm.update(PRED + (PRED == 1).long() * 3, TARGET)
    with pytest.raises(ValueError, match="same"):
        cm.update(PRED[:, :1], TARGET)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        cm.update(PRED, TARGET.float())
    with pytest.raises(ValueError, match="pred has 4 classes"):
        cm.update(torch.randn(1, 4, 2, 3), TARGET)
    with pytest.raises(ValueError, match="target must have 3 dimensions"):
        cm.update(PRED, TARGET[0])
    with pytest.raises(ValueError, match="matrix must be square"):
        metrics_from_confusion(torch.zeros(2, 3))


_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from ovseg_fast.metrics import ConfusionMatrix
    from tests.test_metrics import _random_batches
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cm = ConfusionMatrix(5, seen=[0, 1, 2], unseen=[3, 4])
    for i, (scores, target) in enumerate(_random_batches(n=5)):
        if i % 2 == rank:  # uneven: rank 0 gets 3 batches, rank 1 gets 2
            cm.update(scores, target)
    first, again = cm.compute(), cm.compute()
    torch.save({"local": cm.matrix, "first": first, "again": again}, f"{out}.{rank}")
    # Both ranks done before either tears down: otherwise gloo's threads can abort the exit.
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_two_processes_equal_one_process(tmp_path):
    parts = run_gloo_workers(_WORKER, tmp_path)

    single = ConfusionMatrix(5, seen=[0, 1, 2], unseen=[3, 4])
    for scores, target in _random_batches(n=5):
        single.update(scores, target)
    expected = single.compute()
    assert not torch.equal(parts[0]["local"], single.matrix)  # each rank really held only part of the data
    assert torch.equal(parts[0]["local"] + parts[1]["local"], single.matrix)
    for part in parts:
        for got in (part["first"], part["again"]):  # compute() twice does not double the counts
            assert got.pixels == expected.pixels
            torch.testing.assert_close(got.iou, expected.iou, equal_nan=True)
            assert (got.miou, got.seen_miou, got.unseen_miou, got.hiou) == pytest.approx(
                (expected.miou, expected.seen_miou, expected.unseen_miou, expected.hiou)
            )
