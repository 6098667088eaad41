"""Several runs at once, each with its own record, the teacher shared."""

from conftest import copy_run, short_kd

from kcdlib.parallel import ensure_all


def test_two_workers_train_two_runs_and_reuse_the_teacher(store, digits_teacher, tmp_path):
    runs = tmp_path / "runs"
    copy_run(store, digits_teacher, runs)
    configs = [short_kd(digits_teacher, epochs=1, seed=s) for s in (11, 12)]
    records = ensure_all(configs + configs[:1], str(runs), devices=["cpu"], jobs_per_device=2, progress=False)
    hashes = [store.path(c).name for c in (digits_teacher, *configs)]
    assert [r["hash"] for r in records] == [hashes[1], hashes[2], hashes[1]]
    assert records[0] == records[2]
    assert records[0]["config"]["seed"] == 11 and records[1]["config"]["seed"] == 12
    assert sorted(p.parent.name for p in runs.glob("*/record.json")) == sorted(hashes)
