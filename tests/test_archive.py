"""Runs made elsewhere, rendered here: export, import into a fresh store, render --from-records; tampered archives
refused with one line."""

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import nbformat
import pytest
from conftest import run_cli

from kcdlib import NUMERICS_VERSION, book
from kcdlib.archive import export_runs, import_runs, recorded_code, recorded_fingerprints
from kcdlib.buildoptions import BuildOptions
from kcdlib.cli import main
from kcdlib.cluster import book_runs
from kcdlib.errors import DatasetMissing, StoreError
from kcdlib.identity import distill_config
from kcdlib.records import sealed, write_json
from kcdlib.runs import RunStore

pytestmark = pytest.mark.slow
NOTEBOOK = "table5"  # one run of the tiny profile, and the suite's digits teacher


def table_cells(nb_path: Path) -> list[list[str]]:
    """The cells of the notebook's captioned table, row by row (the HTML's <th>/<td> texts)."""
    nb = nbformat.read(nb_path, as_version=4)
    html = next(o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if "Profile 'tiny'" in o.get("data", {}).get("text/html", ""))  # fmt: skip
    rows = re.findall(r"<tr.*?>(.*?)</tr>", html, flags=re.S)
    return [[re.sub(r"<.*?>", "", cell).strip() for cell in re.findall(r"<t[hd].*?>(.*?)</t[hd]>", row, re.S)]
            for row in rows]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runs_dir, digits_teacher, monkeypatch_module):
    """The tiny profile's table 5 built here, and its runs exported (with their models)."""
    out = tmp_path_factory.mktemp("built")
    book.build_book(
        BuildOptions(profile="tiny", runs_dir=str(runs_dir)),
        out=out,
        names=(NOTEBOOK,),
        html=False,
        echo=lambda line: None,
    )
    configs, store = book_runs(BuildOptions(profile="tiny", runs_dir=str(runs_dir), device="cpu"), (NOTEBOOK,))
    archive = out / "runs.tar.gz"
    manifest = export_runs(configs, store, archive, models=True, profile="tiny", echo=lambda line: None)
    return out, archive, manifest, configs, store


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the notebook kernels run beside the test process
        yield mp


def test_export_import_and_render_from_records_give_the_same_table(exported, tmp_path):
    out, archive, manifest, configs, store = exported
    assert len(manifest["runs"]) == 2 and not manifest["missing"]  # the run and its teacher
    assert manifest["data"]["digits"] == store.fingerprint("digits")
    fresh = tmp_path / "fresh"
    done = run_cli("runs", "import", str(archive), "--runs-dir", str(fresh))
    assert done.returncode == 0 and done.stdout.startswith("imported 2 runs into"), done.stderr
    for cfg in configs:
        assert (fresh / store.path(cfg).name / "record.json").read_bytes() == (
            store.path(cfg) / "record.json"
        ).read_bytes()
    rendered = tmp_path / "rendered"
    done = run_cli("book", "--profile", "tiny", "--only", NOTEBOOK, "--from-records", "--skip-html", "--runs-dir",
                   str(fresh), "--out", str(rendered), "--data-root", str(tmp_path / "no-data"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "the data fingerprints and the code are the recorded ones (digits; code " in done.stdout
    assert sorted(p.name for p in fresh.iterdir()) == sorted(manifest["runs"])  # nothing trained
    said = (rendered / "book" / "_provenance.md").read_text()
    assert (
        said.startswith("**This book was rendered from records**")
        and store.fingerprint("digits")["train_sha256"][:16] in said
    )
    a = table_cells(out / "book" / "artefacts" / f"{NOTEBOOK}.ipynb")
    b = table_cells(rendered / "book" / "artefacts" / f"{NOTEBOOK}.ipynb")
    assert len(a) > 2 and a == b


def test_from_records_names_every_missing_run(tmp_path):
    done = run_cli("book", "--profile", "tiny", "--only", NOTEBOOK, "--from-records", "--skip-html", "--runs-dir",
                   str(tmp_path / "empty"), "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--from-records trains nothing" in done.stderr and "lacks 2 runs" in done.stderr
    assert "resnet20 trained alone" in done.stderr


def test_a_store_renders_from_recorded_fingerprints_without_the_data(tmp_path):
    """A CIFAR-100 run recorded elsewhere, by other code: found, and reused, with no CIFAR-100 here and this code;
    nothing else trains."""
    cfg = distill_config("cifar100", "resnet8", teacher_checkpoint=__file__, teacher_arch="resnet20", epochs=2)
    other = distill_config("cifar100", "resnet8", teacher_checkpoint=__file__, teacher_arch="resnet20", epochs=4)
    data = {"name": "cifar100", "num_train": 50000, "num_test": 10000, "train_sha256": "ab" * 32,
            "test_sha256": "cd" * 32}  # fmt: skip
    maker = RunStore(tmp_path / "runs", recorded_fingerprints={"cifar100": data}, recorded_code="feedfacefeedface")
    folder = maker.path(cfg)
    folder.mkdir(parents=True)
    identity = maker.identity(cfg)
    write_json(folder / "config.json", {"hash": folder.name, "options_hash": cfg.options_hash, "identity": identity})
    epochs = [{"epoch": e, "top1": 71.5, "top5": 90.0} for e in (1, 2)]
    record = sealed({"hash": folder.name, "config": cfg.canonical(), "data": data, "numerics": NUMERICS_VERSION,
                     "code": "feedfacefeedface", "final_top1": 71.5, "best_top1": 71.5, "final_top5": 90.0,
                     "computation": 1.0, "points_distilled": 100000, "wall_seconds": 1.0, "epochs": epochs,
                     "model_sha256": "0" * 64, "finished": "earlier"})  # fmt: skip
    write_json(folder / "record.json", record)
    with pytest.raises(DatasetMissing):
        RunStore(tmp_path / "runs", data_root=str(tmp_path / "no-data")).record(cfg)
    assert recorded_fingerprints(tmp_path / "runs") == {"cifar100": data}
    assert recorded_code(tmp_path / "runs") == "feedfacefeedface"
    store = RunStore(tmp_path / "runs", data_root=str(tmp_path / "no-data"),
                     recorded_fingerprints=recorded_fingerprints(tmp_path / "runs"),
                     recorded_code=recorded_code(tmp_path / "runs"))  # fmt: skip
    assert store.ensure(cfg, progress=False)["final_top1"] == 71.5
    with pytest.raises(StoreError, match="trains nothing"):
        store.ensure(other, progress=False)


def rewrite(archive: Path, target: Path, change) -> Path:
    """A copy of ``archive`` with ``change(name, data) -> [(name, data, kind)]`` applied to each member."""
    with tarfile.open(archive, "r:gz") as src, tarfile.open(target, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read()
            for name, content, kind in change(member.name, data):
                info = tarfile.TarInfo(name)
                info.size = len(content) if kind == tarfile.REGTYPE else 0
                info.type = kind
                if kind == tarfile.SYMTYPE:
                    info.linkname = "/etc/passwd"
                dst.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
    return target


def test_tampered_archives_are_refused_with_one_line(exported, tmp_path, capsys):
    _, archive, manifest, _, _ = exported
    record = next(n for n in manifest["files"] if n.endswith("record.json"))
    rec = json.loads(tarfile.open(archive).extractfile(record).read())
    rec["final_top1"] += 1.0
    metric = json.dumps(rec).encode()

    def manifest_with(**files):
        m = json.loads(json.dumps(manifest))
        m["files"].update(files)
        return json.dumps(m).encode()

    cases = {
        # a changed metric: not the file the manifest lists
        "metric": lambda n, d: [(n, metric if n == record else d, tarfile.REGTYPE)],
        # ... and with the manifest's checksum changed to match: the record's own checksum fails
        "metric+manifest": lambda n, d: [
            (
                n,
                metric
                if n == record
                else (manifest_with(**{record: hashlib.sha256(metric).hexdigest()}) if n == "manifest.json" else d),
                tarfile.REGTYPE,
            )
        ],  # fmt: skip
        # a changed checksum in the manifest
        "checksum": lambda n, d: [
            (n, manifest_with(**{record: "0" * 64}) if n == "manifest.json" else d, tarfile.REGTYPE)
        ],  # fmt: skip
        # a pickle inside
        "pickle": lambda n, d: (
            [(n, d, tarfile.REGTYPE)]
            + ([("runs/evil.pkl", b"cos\nsystem\n(S'id'\ntR.", tarfile.REGTYPE)] if n == record else [])
        ),  # fmt: skip
        "path": lambda n, d: (
            [(n, d, tarfile.REGTYPE)] + ([("../escape.json", b"{}", tarfile.REGTYPE)] if n == record else [])
        ),  # fmt: skip
        "symlink": lambda n, d: (
            [(n, d, tarfile.REGTYPE)]
            + ([("runs/0123456789abcdef/record.json", b"", tarfile.SYMTYPE)] if n == record else [])
        ),  # fmt: skip
    }
    expected = {"metric": "not the file the manifest names", "metric+manifest": "damaged or was changed",
                "checksum": "not the file the manifest names", "pickle": "unexpected member 'runs/evil.pkl'",
                "path": "unexpected member '../escape.json'", "symlink": "not a plain file"}  # fmt: skip
    for case, change in cases.items():
        bad = rewrite(archive, tmp_path / f"{case}.tar.gz", change)
        store = tmp_path / f"store-{case}"
        code = main(["runs", "import", str(bad), "--runs-dir", str(store)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected[case] in err, (case, err)
        assert not store.exists() or not any(store.iterdir()), case  # nothing imported
    with pytest.raises(Exception, match="not a readable kcd runs archive"):
        import_runs(Path(__file__), RunStore(tmp_path / "x"))
