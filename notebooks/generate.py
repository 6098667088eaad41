"""Write the book's notebooks (``python notebooks/generate.py``): thin, output-free, diff-clean .ipynb files.

Each notebook: a ``parameters`` cell (papermill injects new values after it), one call that makes sure the runs
exist, one call that builds the artefact, prose around them. The logic lives in ``kcdlib.report``.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

PARAMS = '''profile = "smoke"      # smoke (CPU, minutes), course (one GPU), paper (the paper's protocol), tiny (tests)
data_root = "../data"  # where CIFAR-100 / ImageNet live (digits is embedded in scikit-learn)
runs_dir = "../runs"   # the run store: finished runs are reused, never retrained
device = None          # None: the profile's device; or "cpu", "cuda", "cuda:1"
seeds = None           # None: the profile's seeds; e.g. [0, 1, 2] for mean ± sd
devices = None         # e.g. ["cuda:0", "cuda:1"]: spread the missing runs over these devices
jobs_per_device = 1    # runs at once on each device (small CIFAR networks leave a GPU mostly idle)
compile_mode = "off"   # "reduce-overhead": torch.compile with CUDA graphs (fastest on a GPU)
stale = "stop"         # a record of these options made on other data or code: "stop", "rerun" or "keep"
teachers_dir = None    # RepDistiller's published teachers (<arch>_vanilla/ckpt_epoch_240.pth), used where present
epochs = None          # None: the profile's; a rehearsal shortens the schedule (with stage_epochs, teacher_epochs)
stage_epochs = None
teacher_epochs = None'''

SETUP = '''from myst_nb import glue

from kcdlib import report

p, store = report.setup(profile, runs_dir, data_root, device, seeds=seeds, devices=devices,
                        jobs_per_device=jobs_per_device, compile=compile_mode, stale=stale,
                        teachers_dir=teachers_dir, epochs=epochs, stage_epochs=stage_epochs,
                        teacher_epochs=teacher_epochs{knobs})
print(p.description)'''


def code(src, *tags):
    cell = new_code_cell(src)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def md(src):
    return new_markdown_cell(src)


def glue_cell(obj="table"):
    return code(f"for name, value in {obj}.key_numbers.items():\n    glue(name, value, display=False)")


def table_notebook(name, title, intro, extra_params="", knobs="", after=""):
    cells = [
        md(f"# {title}\n\n{intro}"),
        code(PARAMS + extra_params, "parameters"),
        code(SETUP.format(knobs=knobs)),
        md("Make sure every run the table needs exists: finished runs are reused, missing ones are trained."),
        code(f"records = report.ensure(store, report.{name}_runs(p))", "remove-stderr"),
        md("The table: the paper's numbers beside ours, and the computation each run actually spent."),
        code(f"table = report.{name}(store, p)\ntable"),
        glue_cell(),
    ]
    if after:
        cells.append(md(after))
    return cells


NOTEBOOKS = {
    "table1": table_notebook(
        "table1", "Table 1: KD, PKT and CRD, with and without knowledge condensation",
        "The paper's main result: knowledge condensation on top of three distillers (logit KD, PKT on "
        "features, CRD with a contrastive memory) raises accuracy while the teacher sees only a fraction `C` of "
        "the knowledge points. Each column is a paper pair; the caption says which pair the profile actually "
        "ran in its place.",
        extra_params='\npairs = None           # paper pairs to run, e.g. ["resnet56/resnet20"]; None: the profile\'s',
        knobs=", table1_pairs=pairs",
        after="`Teacher` and `Student` are the networks trained alone with cross-entropy. `C (counted)` is "
        "measured from the passes the runs made (the supplement's Eq. 18), not computed from the schedule.",
    ),
    "table2": table_notebook(
        "table2", "Table 2: KCD against UNIX at the same computation",
        "UNIX (Xu, Liu, Loy) also saves teacher computation, by distilling only the `k` most uncertain of "
        "each batch of 64 after an uncertainty-aware mixup. Its published setting (`k = 48`) spends more than "
        "KCD; the re-run picks `k` so that its cost (the supplement's Eq. 19, with the student/teacher "
        "multiply-add ratio counted on the pair actually run) equals KCD's `C`.",
        extra_params='\npair = None            # the paper pair, e.g. "vgg13/MobileNetV2"; None: the profile\'s',
        knobs=", table2_pair=pair",
    ),
    "table3": table_notebook(
        "table3", "Table 3: ImageNet, ResNet34 → ResNet18",
        "On ImageNet the paper trains 90 epochs in six stages of 15 and reports the absolute computation "
        "`C_a`, the knowledge points the teacher processed (the paper's values are in the table). "
        "ImageNet is not available offline: the short profiles run a stand-in pair (see the caption).",
    ),
    "table4": table_notebook(
        "table4", "Table 4: what each component of KCD contributes",
        "The supplement does not print the main paper's Table 4, so this ablation is **our reconstruction**: "
        "starting from KD, we add KCD's pieces one at a time: the condensation schedule with a random "
        "ranking, the value ranking by the student's entropy without the cost-aware factor (`α = 0`), the "
        "cost-aware factor, and the knowledge augmentation (full KCD). The last row runs full KCD with the "
        "released code's schedule instead of the paper's.",
        extra_params='\npair = None            # the paper pair; None: the profile\'s',
        knobs=", table4_pair=pair",
        after="The paper's schedule (Eq. 16) spends the computation printed in the paper; the released code "
        "trains its first stage on every point and condenses once more after the last epoch, so it spends "
        "more (see the findings page).",
    ),
    "table5": table_notebook(
        "table5", "Table 5: the cost-aware exponent α",
        "The value of a point is `(F/T)^α · V`: its mean entropy `V`, scaled by how often it was trained. "
        "The supplement varies `α` on three pairs.",
        extra_params='\npairs = None           # paper pairs; None: the profile\'s\nvalues = None          # α values, e.g. [0.01, 0.03]; None: the profile\'s',
        knobs=", grid_pairs=pairs, alphas=values",
    ),
    "table6": table_notebook(
        "table6", "Table 6: the final keep-ratio ρ",
        "`ρ` sets how far the knowledge set shrinks (`τ^t = ρ^{t·T/I}`), and so the computation `C`.",
        extra_params='\npairs = None           # paper pairs; None: the profile\'s\nvalues = None          # ρ values, e.g. [0.9, 0.7]; None: the profile\'s',
        knobs=", grid_pairs=pairs, rhos=values",
    ),
    "table7": table_notebook(
        "table7", "Table 7: knowledge augmentation variants",
        "What to do with the points that fall below the cut (`K0`): drop them (`K1 w/o Aug.`), mix them "
        "into random kept points, into the most valuable kept points (`K1H`), or into the least valuable "
        "kept points (`K1L`, the paper's design).",
        extra_params='\npairs = None           # paper pairs; None: the profile\'s\nvalues = None          # variants among none, random, K1H, K1L; None: the profile\'s',
        knobs=", grid_pairs=pairs, augments=values",
    ),
    "figure5": [
        md("# Figure 5: what the value labels pick\n\n(a) Training images with value label `y = 1` (kept) "
           "and `y = 0` (dropped) at the end of a KCD run. (b) The entropy of the teacher's soft labels, "
           "averaged over the `y = 1` and the `y = 0` points, for four teachers, at the distillation "
           "temperature `T = 4` and at `T = 1`. The paper's reading: the points KCD keeps carry more "
           "information (higher-entropy soft labels) than the ones it drops."),
        code(PARAMS, "parameters"),
        code(SETUP.format(knobs="")),
        code("records = report.ensure(store, report.figure5_runs(p))", "remove-stderr"),
        code("from IPython.display import Markdown\n\nfigure = report.figure5(store, p)\ndisplay(Markdown(figure.caption))\nfigure.figure"),
        md("The numbers behind panel (b):"),
        code('figure.data.pivot_table(index=["teacher", "T"], columns="y", values="entropy").round(3)'),
        glue_cell("figure"),
    ],
    "kcd_in_five_minutes": [
        md("# KCD in five minutes\n\nA teaching notebook: one KD run and one KCD run of the same student "
           "from the same teacher, and a look inside KCD's loop. Knowledge distillation shows the teacher "
           "every training image in every epoch. KCD asks, every `T` epochs, which of these *knowledge "
           "points* are still worth the teacher's forward pass, keeps those, and folds the rest into the "
           "weakest kept ones. Change `profile` to see the same on CIFAR-100."),
        code(PARAMS, "parameters"),
        code(SETUP.format(knobs="")),
        code("kd_cfg, kcd_cfg = report.five_minutes_runs(p)\nkd, kcd = report.ensure(store, [kd_cfg, kcd_cfg])",
             "remove-stderr"),
        md("## The schedule\n\nStage `t` trains on `⌊τ^t N⌋` points with `τ^t = ρ^{t·T/I}` (the paper's "
           "Eq. 16). The first stage has no value estimate yet: a seeded random subset. From then on, all "
           "`N` points are ranked, so a point dropped earlier can come back."),
        code("n = store.dataset(p.dataset).num_train\nstages = report.stage_table(kcd, n)\n"
             "display(stages)\nreport.plot_stages(stages)"),
        md("## The values\n\nDuring each training forward KCD records the entropy of the student's "
           "prediction for every point (OGVE); its value is the mean entropy `V` scaled by `(F/T)^α`, `F` "
           "being how often it was trained. Below, the score of the points kept and dropped at each "
           "condensation (the run replayed epoch by epoch; the replay is cached beside the run)."),
        code("watch = report.watch_kcd(store, kcd_cfg)\nreport.plot_values(watch)"),
        md("## Which images\n\nThe lowest-valued images dropped at the last condensation (easy, confidently "
           "classified digits) and images that entered the set at a condensation after being out of it."),
        code("report.plot_points(store, kcd_cfg, watch)"),
        md("## KD against KCD"),
        code('curves = report.accuracy_curves(store, {"KD": kd_cfg, "KCD": kcd_cfg})\n'
             'ax = curves.pivot(index="epoch", columns="run", values="top1").plot(figsize=(6, 3), ylabel="test top-1 %")\n'
             'summary = {"KD top-1": kd["final_top1"], "KCD top-1": kcd["final_top1"],\n'
             '           "KCD computation C (counted)": kcd["computation"], "KCD C (formula)": kcd["computation_formula"]}\n'
             "summary"),
        code('glue("kd_top1", kd["final_top1"], display=False)\nglue("kcd_top1", kcd["final_top1"], display=False)\n'
             'glue("kcd_computation", 100 * kcd["computation"], display=False)\n'
             'glue("kd_seconds", kd["wall_seconds"], display=False)\nglue("kcd_seconds", kcd["wall_seconds"], display=False)\n'
             'glue("epochs", p.epochs, display=False)\nglue("device", kd["device"], display=False)\n'
             'glue("profile", p.name, display=False)'),
    ],
}


def main():
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells)
        nb.metadata = {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{name}-{i}"
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
