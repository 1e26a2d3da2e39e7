"""Separability probes: ~100% on separable features, chance on shuffled labels, the length shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffdpo.eval.probe import (
    bag_of_words_features,
    binomial_chance_bound,
    length_features,
    linear_probe,
    pair_probe,
    pooled_hidden_states,
)


def separable(n: int = 400, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features labelled by a random hyperplane, with a margin of 0.5 cut out around it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    x = rng.normal(size=(4 * n, dim)) * rng.uniform(0.5, 5.0, size=dim) + rng.normal(size=dim) * 3
    score = (x - x.mean(0)) @ w / np.linalg.norm(w)
    keep = np.abs(score) > 0.5
    return x[keep][:n], (score[keep][:n] > 0).astype(int)


def test_separable_features_are_probed_to_near_100_percent():
    x, y = separable()
    res = linear_probe(x, y, seed=0)
    assert res.heldout_accuracy >= 0.97 and res.train_accuracy >= 0.97
    assert res.n_train + res.n_heldout == 400 and res.n_heldout == 120
    assert res.ci_low <= res.heldout_accuracy <= res.ci_high
    # torch inputs and bool labels are accepted; the split is seeded
    again = linear_probe(torch.from_numpy(x), torch.from_numpy(y.astype(bool)), seed=0)
    assert again.heldout_accuracy == res.heldout_accuracy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_labels_give_chance(seed):
    """Labels shuffled independently of the features: held-out accuracy within 3 binomial sd of 0.5
    (|acc - 0.5| <= 3 * sqrt(0.25 / n), n = 300 held-out rows: 0.087)."""
    x, y = separable(n=1000, seed=seed)
    y = np.random.default_rng(100 + seed).permutation(y)
    res = linear_probe(x, y, seed=seed)
    assert abs(res.heldout_accuracy - 0.5) <= binomial_chance_bound(res.n_heldout)
    assert binomial_chance_bound(300) == pytest.approx(3 * 0.5 / np.sqrt(300))


def test_length_probe_separates_when_chosen_are_always_longer():
    rng = np.random.default_rng(0)
    words = ["good", "bad", "warm", "cold", "fine", ","]
    rejected, chosen = [], []
    for _ in range(100):
        k = int(rng.integers(2, 8))
        rejected.append(" ".join(rng.choice(words, size=k)))
        chosen.append(" ".join(rng.choice(words, size=k + int(rng.integers(1, 4)))))
    res = pair_probe(length_features(chosen), length_features(rejected))  # mode="difference"
    assert res.heldout_accuracy >= 0.97
    # lengths overlap across pairs (chosen k + 1 vs another pair's rejected k + 2): rows alone do not separate
    rows = pair_probe(length_features(chosen), length_features(rejected), mode="rows")
    assert rows.heldout_accuracy < 0.8
    # unless every chosen is longer than every rejected
    long = [c + " , fine , fine , fine , fine , fine , fine" for c in chosen]
    assert pair_probe(length_features(long), length_features(rejected), mode="rows").heldout_accuracy >= 0.97
    # the words themselves are drawn alike: a bag of words (without length) does far worse than length
    bow_c, vocab = bag_of_words_features(chosen)
    bow_r, _ = bag_of_words_features(rejected, vocab)
    normalise = lambda m: m / m.sum(1, keepdims=True)  # noqa: E731 - word frequencies, length removed
    freq = pair_probe(normalise(bow_c), normalise(bow_r))
    assert freq.heldout_accuracy < 0.75


def test_bag_of_words_finds_a_lexical_shortcut_and_counts_by_hand():
    """'Good good ok' over vocabulary [bad, good, ok] -> (0, 2, 1); unknown words are ignored."""
    feats, vocab = bag_of_words_features(["Good good ok", "bad unknown"], ["bad", "good", "ok"])
    assert vocab == ["bad", "good", "ok"]
    assert feats.tolist() == [[0, 2, 1], [1, 0, 0]]
    built, built_vocab = bag_of_words_features(["b a", "a"])
    assert built_vocab == ["a", "b"] and built.tolist() == [[1, 1], [1, 0]]
    rng = np.random.default_rng(1)
    filler = ["the", "pizza", "was", "and"]
    chosen = [" ".join([*rng.choice(filler, 4), "certainly"]) for _ in range(80)]
    rejected = [" ".join(rng.choice(filler, 5)) for _ in range(80)]
    c, v = bag_of_words_features(chosen)
    r, _ = bag_of_words_features(rejected, v)
    assert pair_probe(c, r).heldout_accuracy >= 0.97


def test_pairs_stay_together_and_bad_inputs_are_named():
    x, y = separable(n=40)
    with pytest.raises(ValueError, match=r"features must be \(N, F\)"):
        linear_probe(x[:, 0], y)
    with pytest.raises(ValueError, match="0/1"):
        linear_probe(x, y * 2)
    with pytest.raises(ValueError, match="heldout_fraction"):
        linear_probe(x, y, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="chosen and rejected"):
        pair_probe(x[:3], x[:4])
    with pytest.raises(ValueError, match="mode="):
        pair_probe(x[:3], x[:3], mode="both")
    res = pair_probe(x[:20], x[20:], heldout_fraction=0.25)
    assert res.n_heldout == 10 and res.n_train == 30  # 5 of 20 pairs held out, both rows each


def test_pooled_hidden_states_of_the_tiny_lm():
    """Mean over completion tokens only: the prompt does not enter the pooled row, padding does not change it,
    and the state of a one-token completion is that token position's last hidden state."""
    from diffdpo.toy.tiny_lm import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(len(tok), hidden_size=32, layers=1, seed=0)
    prompts = ["review of the pizza :", "review of the film :", "review of the pizza :"]
    completions = [" good , warm .", " bad", " good , warm . and fine ."]
    feats = pooled_hidden_states(model, tok, prompts, completions, batch_size=3)
    assert feats.shape == (3, 32)
    alone = pooled_hidden_states(model, tok, prompts[:1], completions[:1])
    np.testing.assert_allclose(feats[0], alone[0], atol=1e-5)  # padding in a batch changes nothing
    ids = tok(prompts[1] + completions[1])["input_ids"]
    with torch.no_grad():
        last = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    np.testing.assert_allclose(feats[1], last.numpy(), atol=1e-5)
