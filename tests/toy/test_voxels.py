"""The voxel-objects world: classes, a fair share of unstable objects, meshes the simulator agrees with."""

from __future__ import annotations

import numpy as np

import sim
from diffdpo.toy.voxels import (
    CLASSES,
    GRID,
    ShapeBank,
    diversity,
    largest_component,
    make_objects,
    occupancy_to_mesh,
    static_stability,
    to_occupancy,
    to_tensor,
)


def test_every_class_has_variety_and_the_world_has_a_fair_share_of_unstable_objects():
    objects = make_objects(30, seed=5)
    assert [o.name for o in objects[::30]] == list(CLASSES)
    stable = np.array([static_stability(o.occupancy)[0] for o in objects])
    assert 0.25 < 1 - stable.mean() < 0.7  # a fair share unstable, not most
    for c in range(len(CLASSES)):
        grids = np.stack([o.occupancy for o in objects if o.label == c])
        assert grids.shape[1:] == (GRID,) * 3 and grids.any(axis=(1, 2, 3)).all()
        assert len({g.tobytes() for g in grids}) > 20  # realistic variety, not a handful of templates
        assert grids[:, 0].any(axis=(1, 2)).all()  # every object rests on the ground


def test_every_class_is_between_30_and_70_percent_stable_in_simulation():
    # Per class, not only overall: a class whose data is mostly unstable makes "stable and still of its
    # class" a reward the generator can only earn by leaving its data. The first world's tables were
    # 26% stable here and the weakest class of most DSO runs (docs/results/dso.md, "The second world"); now
    # 48%, and the least stable class (lamps) 36%.
    objects = make_objects(100, seed=3)
    results = sim.score_meshes([occupancy_to_mesh(o.occupancy) for o in objects], workers=0)
    labels = np.array([o.label for o in objects])
    stable = np.array([r.valid and r.stable for r in results])
    per_class = {CLASSES[c]: stable[labels == c].mean() for c in range(len(CLASSES))}
    assert all(0.3 <= v <= 0.7 for v in per_class.values()), per_class


def test_objects_are_reproducible_from_the_seed():
    a, b = make_objects(3, seed=1), make_objects(3, seed=1)
    assert all(np.array_equal(x.occupancy, y.occupancy) for x, y in zip(a, b))


def test_marching_cubes_meshes_are_closed_and_the_simulator_agrees_on_clear_cases():
    objects = make_objects(8, seed=2)
    clear = [o for o in objects if abs(static_stability(o.occupancy)[1]) > 8.0][:16]
    meshes = [occupancy_to_mesh(o.occupancy) for o in clear]
    assert all(m.is_watertight and m.volume > 0 for m in meshes)
    results = sim.score_meshes(meshes, sim.StabilityConfig(duration_s=1.5), workers=0)
    expected = [static_stability(o.occupancy)[0] for o in clear]
    agree = np.mean([r.valid and r.stable == e for r, e in zip(results, expected)])
    assert agree >= 0.85 and any(expected) and not all(expected)


def test_decode_keeps_the_largest_component_and_empty_grids_give_none():
    occ = np.zeros((GRID,) * 3, dtype=bool)
    assert occupancy_to_mesh(occ) is None
    occ[0:4, 2:5, 2:5] = True
    occ[10, 12, 12] = True  # a floating speck
    assert largest_component(occ).sum() == 36
    assert to_occupancy(to_tensor(occ)).sum() == occ.sum()


def test_fidelity_is_one_on_training_objects_and_drops_for_a_solid_block():
    objects = make_objects(10, seed=0)
    bank = ShapeBank(objects)
    grids = np.stack([o.occupancy for o in objects])
    labels = [o.label for o in objects]
    m = bank.measure(grids, labels)
    assert np.allclose(m["fidelity"], 1.0) and m["recognised"].mean() > 0.95
    block = np.zeros((GRID,) * 3, dtype=bool)
    block[:10, 3:13, 3:13] = True  # the "grow into a solid block" cheat
    cheat = bank.measure(block[None], [0])
    assert cheat["fidelity"][0] < 0.5 and cheat["volume_ratio"][0] > 3
    assert diversity(grids[:10]) > 0.2 and diversity(np.stack([block, block])) == 0.0


def test_a_legless_floating_top_is_measured_as_the_slab_the_simulator_sees():
    from diffdpo.toy.voxels import decoded_occupancy

    table = make_objects(1, seed=0, classes=[0])[0].occupancy
    top_only = table.copy()
    top_only[: int(table.sum(axis=(1, 2)).argmax())] = False  # remove the legs (below the widest layer, the top)
    assert top_only.sum() < table.sum()
    decoded = decoded_occupancy(top_only)
    assert decoded[0].any() and decoded.sum() == top_only.sum()  # dropped onto the ground
    bank = ShapeBank(make_objects(20, seed=0, classes=[0]))
    assert bank.measure(decoded[None], [0])["fidelity"][0] < bank.measure(top_only[None], [0])["fidelity"][0]
