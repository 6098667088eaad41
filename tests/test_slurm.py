"""The runs of a build on a real Slurm: Debian's slurm-wlm and munge, one node started by tests/slurm/start.sh.

Without Slurm (or as a user who cannot start its daemons) these tests are skipped, saying why; in CI (CI=true) that
is a failure: .ci/run installs Slurm."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import CHILD_ENV

from kcdlib.cluster import SlurmError, SlurmOptions, ensure_on_slurm, submit
from kcdlib.identity import distill_config, teacher_config
from kcdlib.runs import RunStore
from kcdlib.slurmjobs import wait

pytestmark = pytest.mark.slow
START = Path(__file__).parent / "slurm" / "start.sh"
# What differs between two trainings of one run: when and how fast, the checksum over that, the commit.
VOLATILE = ("wall_seconds", "finished", "checksum", "git_commit")


def stable(record: dict) -> dict:
    rec = {k: v for k, v in json.loads(json.dumps(record)).items() if k not in VOLATILE}
    rec["epochs"] = [{k: v for k, v in row.items() if k != "seconds"} for row in rec["epochs"]]
    return rec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm of this session (its own ports, munge key and state), stopped at the end."""
    why = None
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        why = "no Slurm here: apt-get install slurm-wlm munge (.ci/run does)"
    elif os.geteuid() != 0:
        why = "the test Slurm starts munged, slurmctld and slurmd as root, and this is not root"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {why}")
        pytest.skip(why)
    folder = Path(tempfile.mkdtemp(prefix="kcd-slurm-"))
    folder.chmod(0o755)  # munged runs as the munge user and must reach its folder
    env = dict(os.environ, SLURMCTLD_PORT=str(_free_port()), SLURMD_PORT=str(_free_port()))
    start = time.perf_counter()
    subprocess.run([str(START), str(folder)], check=True, env=env, timeout=120)
    print(f"slurm started in {time.perf_counter() - start:.1f} s")
    # Jobs inherit this environment (sbatch's --export=ALL): this cluster, one thread each, this checkout's kcdlib.
    # The local runs they are compared with train on one thread too: a run's weights depend on the thread count.
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(folder / "slurm.conf"))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("PYTHONPATH", CHILD_ENV.get("PYTHONPATH") or str(Path(__file__).parents[1]))
        torch.set_num_threads(1)
        try:
            yield folder
        finally:
            torch.set_num_threads(threads)
            subprocess.run([str(START), str(folder), "stop"], check=False, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def options(tmp: Path, time_min: int = 10) -> SlurmOptions:
    return SlurmOptions(logs=str(tmp / "slurm-logs"), gpus_per_node=0, time_min=time_min, cpus_per_job=1)


@pytest.fixture(scope="module")
def slurm_teacher():
    return teacher_config("digits", "resnet8", seed=3, epochs=2)


def test_slurm_runs_teachers_first_match_the_local_records_and_report_a_failure(slurm, slurm_teacher, tmp_path):
    students = [distill_config("digits", "resnet8", teacher=slurm_teacher, epochs=2, seed=s) for s in (0, 1)]
    bad_ckpt = tmp_path / "resnet20_vanilla.pth"
    bad_ckpt.write_bytes(b"not a checkpoint")
    failing = distill_config("digits", "resnet8", teacher_checkpoint=str(bad_ckpt), teacher_arch="resnet20", epochs=2)
    store = RunStore(tmp_path / "runs")
    lines = []
    with pytest.raises(SlurmError) as err:
        ensure_on_slurm([*students, failing], store, options(tmp_path), echo=lines.append, poll_s=1)
    # The failing run is named with its job and the end of its log; the others finished.
    message = str(err.value)
    assert message.startswith("1 of 4 Slurm jobs failed") and store.path(failing).name in message
    assert re.search(r"job \d+ failed: kcdlib.errors.CheckpointError: cannot read checkpoint ", message)
    assert "_log.err:\n    " in message
    assert lines[-1] == "slurm: 0 queued, 0 running, 3 done, 1 failed (4 jobs)"
    # Identical to the local executor's records: run hashes, metrics, model hashes.
    local = RunStore(tmp_path / "local")
    for cfg in (slurm_teacher, *students):
        assert stable(store.record(cfg)) == stable(local.ensure(cfg, progress=False))
    # The students waited for the teacher's job by a Slurm dependency, and started after it ended.
    scripts = {p.name: p.read_text() for p in (tmp_path / "slurm-logs").glob("*/*_submission.sh")}
    teacher_job = next(n.split("_")[0] for n, s in scripts.items() if "kcd-teachers" in s)
    student_script = next(s for s in scripts.values() if "kcd-students" in s and "afterok" in s)
    assert f"#SBATCH --dependency=afterok:{teacher_job}\n" in student_script  # one teacher: a job, not an array
    student_job = next(n.split("_")[0] for n, s in scripts.items() if s is student_script)
    t, s = job_info(teacher_job), job_info(f"{student_job}_0")
    assert s["StartTime"] >= t["EndTime"], (t["EndTime"], s["StartTime"])


def test_a_preempted_job_is_requeued_and_ends_with_the_uninterrupted_record(slurm, slurm_teacher, tmp_path):
    student = distill_config("digits", "resnet8", teacher=slurm_teacher, epochs=8, seed=5)
    store = RunStore(tmp_path / "runs")
    store.ensure(slurm_teacher, progress=False)
    # A time limit well above the run's, so that submitit takes the signal for a preemption, not a time-out.
    (job,) = submit([student], store, options(tmp_path, time_min=60), echo=lambda line: None)
    run_dir = store.path(student)
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("checkpoint-e00000[2-9]*.pt")):
        assert time.monotonic() < deadline, "the job did not reach its second epoch"
        time.sleep(0.2)
    # What Slurm does on preemption (and before a time limit): USR2 to the job's steps; submitit requeues.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    # Slurm makes a requeued job eligible again two minutes later (fixed in slurmctld): the test, as the job's
    # owner may, moves that to now once the job is back in the queue.
    while not (int(job_info(job.job_id).get("Restarts", 0)) and job_info(job.job_id)["JobState"] == "PENDING"):
        assert time.monotonic() < deadline, "the job was not requeued"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
    outcomes = wait([job], echo=lambda line: None, poll_s=1)
    assert outcomes[job.job_id].ok, outcomes[job.job_id]
    assert int(job_info(job.job_id)["Restarts"]) >= 1
    assert "this job is preempted" in Path(job.job.paths.stderr).read_text()
    assert stable(store.record(student)) == stable(RunStore(tmp_path / "local").ensure(student, progress=False))


def test_a_store_where_the_lock_does_not_hold_across_nodes_is_refused(tmp_path):
    from kcdlib.errors import StoreError
    from kcdlib.sharedfs import check_lock, lock_problem, mount_of

    assert lock_problem("lustre", {"rw", "flock"}) is None
    assert "localflock" in lock_problem("lustre", {"rw", "localflock"})
    assert "mount it with -o flock" in lock_problem("lustre", {"rw"})
    assert lock_problem("nfs4", {"rw", "local_lock=none"}) is None
    assert lock_problem("nfs", {"rw", "local_lock=flock"}) and lock_problem("nfs4", {"nolock"})
    assert lock_problem("ext4", {"rw"}) is None
    check_lock(tmp_path / "store")  # this machine's own disk: the lock holds
    assert mount_of(tmp_path)[1]
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError):
        check_lock(tmp_path / "file" / "store")


def test_time_limits_come_from_the_plan_with_a_margin(tmp_path):
    from kcdlib.cluster import MIN_TIME_MIN, job_minutes
    from kcdlib.estimate import gpu_run_seconds

    cifar = distill_config("cifar100", "resnet8x4", teacher_checkpoint=__file__, teacher_arch="resnet32x4")
    opts = SlurmOptions(logs=str(tmp_path))
    assert job_minutes([cifar], 1, opts) == max(MIN_TIME_MIN, -(-2 * gpu_run_seconds(cifar) // 60))
    assert job_minutes([cifar] * 4, 4, opts) < job_minutes([cifar] * 4, 1, opts)  # packed runs share the GPU
    assert job_minutes([cifar], 1, SlurmOptions(logs=str(tmp_path), time_min=7)) == 7
    assert SlurmOptions(logs="x", sbatch=("--mail-type=END", "--constraint=h100")).extra() == {
        "mail_type": "END", "constraint": "h100"}  # fmt: skip
    assert SlurmOptions(logs="x", sbatch=("--exclusive",)).extra() == {"exclusive": True}
    with pytest.raises(Exception, match="--key=value or --flag"):
        SlurmOptions(logs="x", sbatch=("constraint=h100",)).extra()
