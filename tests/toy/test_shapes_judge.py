"""The shapes world and its judge: arithmetic on rendered images of known content."""

from __future__ import annotations

import numpy as np
import pytest

from diffdpo.rewards.shapes_judge import ShapesJudge, attribute_accuracy, judge_image
from diffdpo.toy.shapes import (
    ANCHORS,
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    all_captions,
    parse_caption,
    random_scene,
    render,
)


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
    """score = colour_ok + shape_ok + position_ok + 0.5 * aesthetic.
    A perfectly centred render matches all three and its aesthetic is 0.5 * centring + 0.5 * cleanliness
    with centring 1 - dist / (0.25 * 16) near 1. The same image judged against a caption with the
    wrong colour loses exactly 1 point; with the wrong colour and position it also loses the centring."""
    img = render(Scene("green", "triangle", "top"), 16)
    right = judge_image(img, "a green triangle on the top")
    assert right.colour_ok and right.shape_ok and right.position_ok
    assert right.centring > 0.9 and right.cleanliness > 0.95
    assert right.score == pytest.approx(3 + 0.5 * (0.5 * right.centring + 0.5 * right.cleanliness))
    wrong_colour = judge_image(img, "a red triangle on the top")
    assert wrong_colour.score == pytest.approx(right.score - 1.0)
    wrong_both = judge_image(img, "a red triangle on the bottom")
    # anchors top (y = 0.27) and bottom (y = 0.73) are 0.46 image heights apart > 0.25: centring 0
    assert not wrong_both.position_ok and wrong_both.centring == 0.0
    assert wrong_both.score == pytest.approx(1.0 + 0.25 * wrong_both.cleanliness)
    assert ANCHORS["bottom"][1] - ANCHORS["top"][1] > 0.25


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
