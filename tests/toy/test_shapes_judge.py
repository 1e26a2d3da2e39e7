"""The shapes world and its judge: arithmetic on rendered images of known content."""

from __future__ import annotations

import numpy as np
import pytest

from diffdpo.toy.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    all_captions,
    parse_caption,
    random_scene,
    render,
)
from diffdpo.toy.shapes_judge import ShapesJudge, attribute_accuracy, judge_image


def test_captions_round_trip():
    caps = all_captions()
    assert len(caps) == len(set(caps)) == len(COLOURS) * len(SHAPES) * len(POSITIONS)
    for cap in caps:
        assert parse_caption(cap).caption == cap
    with pytest.raises(ValueError, match="'a purple thing'"):
        parse_caption("a purple thing")


def test_render_is_the_scene():
    """A red square in the center: the centre pixel is exactly red, the corners are background."""
    img = render(Scene("red", "square", "center", size=0.5), 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert tuple(img[8, 8]) == COLOURS["red"]
    assert tuple(img[0, 0]) == (0, 0, 0)
    left = render(Scene("blue", "circle", "left"), 16)
    ys, xs = np.nonzero(left.max(axis=2) > 100)
    assert xs.mean() < 8  # mass on the left half


def test_judge_is_right_on_ground_truth_renders():
    """1000 random renders (random size and jitter): colour, shape and position all judged right."""
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(1000)]
    judgements = [judge_image(render(s, 16), s.caption) for s in scenes]
    acc = attribute_accuracy(judgements)
    assert acc["colour"] == 1.0 and acc["shape"] == 1.0 and acc["position"] == 1.0


def test_judge_score_arithmetic():
    """score = colour_ok + shape_ok + position_ok + 0.5 * aesthetic, aesthetic = fill * cleanliness,
    fill = clip((size - 0.30) / 0.25, 0, 1). A clean render of size 0.425 matches all three and has
    fill (0.425 - 0.30) / 0.25 = 0.5 (the size estimate from area is within 0.02 of the truth). The same
    image judged against a caption with the wrong colour loses exactly 1 point, with the wrong colour
    and position 2 points: the aesthetic does not depend on the caption."""
    img = render(Scene("green", "square", "top", size=0.425), 16)
    right = judge_image(img, "a green square on the top")
    assert right.colour_ok and right.shape_ok and right.position_ok
    assert right.size == pytest.approx(0.425, abs=0.02) and right.cleanliness > 0.95
    assert right.fill == pytest.approx((right.size - 0.30) / 0.25)
    assert right.fill == pytest.approx(0.5, abs=0.08)
    assert right.score == pytest.approx(3 + 0.5 * right.fill * right.cleanliness)
    wrong_colour = judge_image(img, "a red square on the top")
    assert wrong_colour.score == pytest.approx(right.score - 1.0)
    wrong_both = judge_image(img, "a red square on the bottom")
    assert not wrong_both.position_ok and wrong_both.score == pytest.approx(right.score - 2.0)


@pytest.mark.parametrize(("size", "fill"), [(0.25, 0.0), (0.30, 0.0), (0.60, 1.0), (0.65, 1.0)])
def test_fill_saturates(size, fill):
    """Fill is 0 at or below 0.30 of the width and 1 from 0.55 up (estimates within 0.03 of the truth),
    and shapes that large are still judged right."""
    j = judge_image(render(Scene("blue", "circle", "left", size=size), 16), "a blue circle on the left")
    assert j.shape_ok and j.position_ok and j.colour_ok
    assert j.size == pytest.approx(size, abs=0.03)
    assert j.fill == pytest.approx(fill, abs=0.12)


def test_empty_image_scores_zero():
    j = judge_image(np.zeros((16, 16, 3), np.uint8), "a red circle on the left")
    assert j.score == 0.0 and j.colour is None


def test_labels_and_ties():
    judge = ShapesJudge(tie_margin=0.1)
    assert judge.label(3.2, 2.0) == (1.0, 0.0)
    assert judge.label(2.0, 3.2) == (0.0, 1.0)
    assert judge.label(3.0, 3.05) == (0.5, 0.5)
    good, bad = render(Scene("red", "circle", "left"), 16), render(Scene("blue", "circle", "left"), 16)
    s = judge([good, bad], ["a red circle on the left"] * 2)
    assert s[0] - s[1] == pytest.approx(1.0, abs=1e-3)  # colour point; aesthetics of the two renders agree
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        judge([good, bad], ["a red circle on the left"])
