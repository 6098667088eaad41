"""One object for a build's options (kcdlib.buildoptions): made from kcd book's flags or a notebook's build parameter
by one rule each, checked once, and the two α named for what they are without changing any run's identity."""

import pytest

from kcdlib import artefacts, cli
from kcdlib.book import REPO
from kcdlib.buildoptions import KNOBS, NOTEBOOK_DEFAULTS, BuildOptions
from kcdlib.errors import BadOption
from kcdlib.identity import HASHED_AS, as_hashed, digest


def test_every_build_option_but_kcd_books_own_is_a_flag_of_kcd_book_of_the_same_name():
    """One map from the command line: each flag is the field of its name (the progress file and the book's root
    are kcd book's to set, not a user's)."""
    parser = cli.build_parser()
    dests = set(vars(parser.parse_args(["book"])))
    assert set(BuildOptions.names()) - dests == {"progress_file", "book_root"}
    args = parser.parse_args(["book", "--profile", "tiny", "--kd-weight", "0.5", "--cost-exponent", "0.1", "--epochs",
                              "4", "--stage-epochs", "2", "--devices", "cpu,cpu", "--seeds", "0,2"])  # fmt: skip
    build = cli.build_options(args, REPO)
    assert (build.profile, build.kd_weight, build.cost_exponent, build.epochs, build.devices, build.seeds) == (
        "tiny", 0.5, 0.1, 4, ("cpu", "cpu"), (0, 2))  # fmt: skip
    assert build.runs_dir == str(REPO / "runs")


def test_a_notebook_build_takes_its_build_dict_and_a_field_papermill_injected_on_its_own():
    namespace = {"build": {"profile": "tiny", "temperature": 3}, "temperature": 2, "pairs": None, "In": []}
    build = BuildOptions.from_notebook(namespace)
    assert (build.profile, build.temperature) == ("tiny", 2)  # the field given on its own wins
    assert (build.runs_dir, build.data_root) == (NOTEBOOK_DEFAULTS["runs_dir"], NOTEBOOK_DEFAULTS["data_root"])
    with pytest.raises(BadOption, match="parameter build must be a mapping"):
        BuildOptions.from_notebook({"build": ["tiny"]})


def test_a_build_survives_the_trip_through_a_notebooks_parameter():
    build = BuildOptions(profile="tiny", runs_dir="/r", seeds=(0, 1), devices=("cpu",), kd_weight=0.5, epochs=4,
                         stage_epochs=2)  # fmt: skip
    assert BuildOptions.from_mapping(build.as_parameters()) == build
    assert BuildOptions.from_mapping(BuildOptions().as_parameters()) == BuildOptions()


@pytest.mark.parametrize(
    "given, needle",
    [
        ({"temprature": 2}, "unknown build option 'temprature' (did you mean 'temperature'?)"),
        ({"kd_alpha": 0.5}, "unknown build option 'kd_alpha'"),
        ({"epochs": 5, "stage_epochs": 2}, "must be a multiple of the stage length (T=2)"),
        ({"epochs": 2, "stage_epochs": 2}, "at least two stages"),
        ({"kd_weight": -1.0}, "option kd_weight must be >= 0"),
        ({"cost_exponent": float("nan")}, "build option cost_exponent must be a number"),
        ({"rho": 0.0}, "option rho must be in (0, 1]"),
        ({"jobs_per_device": 0}, "jobs_per_device must be a whole number >= 1"),
        ({"profile": "tiny", "seeds": []}, "non-empty list"),
    ],
)
def test_a_bad_build_is_refused_where_it_is_made(given, needle):
    with pytest.raises(BadOption) as err:
        BuildOptions.from_mapping(given)
    assert needle in str(err.value)


def test_the_knobs_are_named_as_the_run_options_they_set():
    """--kd-weight sets kd_weight of every distiller that has it and --cost-exponent KCD's: one name from the flag to
    the record, and neither is 'alpha' any more."""
    p = BuildOptions(profile="tiny", kd_weight=0.5, cost_exponent=0.1).applied()
    runs = artefacts.all_runs(p)
    kd = [c for c in runs if c.distiller == "kd"]
    kcd = [c for c in runs if c.method == "kcd"]
    assert kd and all(dict(c.distiller_options)["kd_weight"] == 0.5 for c in kd)
    assert kcd and any(dict(c.method_options)["cost_exponent"] == 0.1 for c in kcd)
    assert all("alpha" not in dict(c.distiller_options) and "alpha" not in dict(c.method_options) for c in runs)
    assert set(KNOBS) <= set(BuildOptions.names())


def test_runs_recorded_when_both_were_alpha_keep_their_identity():
    """The tiny profile's first KCD run, as its options hash was before the renames (both α spelled 'alpha'):
    the hash stands, and the canonical options now say which α is which."""
    cfg = next(c for c in artefacts.all_runs("tiny") if c.method == "kcd" and c.arch == "resnet8" and c.seed == 0
               and dict(c.method_options)["augment"] == "K1L" and dict(c.method_options)["schedule"] == "paper"
               and dict(c.method_options)["untrained"] == "last")  # fmt: skip
    assert cfg.options_hash == "094bb3a1e0398225"
    canonical = cfg.canonical()
    assert "cost_exponent" in canonical["method_options"] and "kd_weight" in canonical["distiller_options"]
    spelled = {**canonical, "method_options": {("alpha" if k == "cost_exponent" else k): v
                                               for k, v in canonical["method_options"].items()},
               "distiller_options": {("alpha" if k == "kd_weight" else k): v
                                     for k, v in canonical["distiller_options"].items()}}  # fmt: skip
    spelled["teacher"] = as_hashed(canonical["teacher"])
    assert digest(spelled) == cfg.options_hash == digest(as_hashed(canonical))
    assert set(HASHED_AS.values()) == {"alpha"}
