"""Several machines, shown on one (issue 21): two `torchrun` launchers on localhost act as two nodes.

Each node is `torchrun --nnodes 2 --node_rank R --nproc_per_node 1` with a static master on a free
loopback port (node 0's launcher hosts the rendezvous), gloo on the CPU, and its own working directory
with relative output paths, as two machines have two disks. One two-node run of the README's recipe
(two epochs of the synthetic data, SAF) is killed and resumed, and shows:

1. Killing node 1 mid-epoch ends node 0 within --dist_timeout, its training process saying so in one line.
2. `--resume latest` on both nodes (node 1 given a copy of the run folder, as the README says) ends
   exactly where an uninterrupted `--world_size 2` run of the same options ends: the two nodes train as
   two processes on one machine, and every rank continues its own random numbers.
3. Only node 0 (global rank 0) writes checkpoints, TensorBoard logs and model_best.
4. Its validations are what one process's evaluation of its checkpoints finds; evaluation.py on two
   nodes gives one process's numbers and matrix.
5. One training step on two nodes (this file run as a script by torchrun) equals the restatement of the
   original's 2-process step, SAF's gate statistics pooled across the nodes (tests/test_equivalence.py);
   and validation scores every rank's share with rank 0's BatchNorm statistics.

Every process runs one thread (float sums depend on the thread count), every launch has a timeout, and
every launcher and training process is killed if a test fails.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

import checkpoint
import data
import distributed
import errors
import evaluation
import opts
import train
from model import SimilarityModel
from tests.conftest import ROOT
from tests.test_equivalence import assert_two_process_results_equal_the_original, write_step_results
from tests.test_reliability import training_state_differences
from vocab import deserialize_vocab

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DIST_TIMEOUT_S = 30
LAUNCH_TIMEOUT_S = 180  # a launch takes 15-40 s on two busy cores; a hang ends the test, not CI
TINY_RUN = ["--img_dim", "64", "--word_dim", "8", "--embed_size", "16", "--sim_dim", "8", "--module_name", "SAF",
            "--batch_size", "16", "--num_epochs", "2", "--learning_rate", "0.005", "--warmup_epochs", "1",
            "--daa_weight", "1", "--seed", "0", "--device", "cpu", "--threads", "1",
            "--dist_timeout", str(DIST_TIMEOUT_S)]
RUN_OUTPUTS = ["--model_name", "run", "--logger_name", "run/log"]  # relative: in each node's own folder
FINISHED = ["checkpoint_0.pth.tar", "checkpoint_1.pth.tar", "model_best.pth.tar"]


def train_argv(synth):
    return ["--data_path", synth.data_path, "--data_name", "f30k_precomp", "--vocab_path", synth.vocab_path,
            *TINY_RUN]


def process_tree(pid):
    """`pid` and every process below it. torchrun starts its workers in their own sessions, so killing
    a launcher's process group would leave its training processes running."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [p for child in f.read().split() for p in process_tree(int(child))]
    except FileNotFoundError:  # it has just exited
        pass
    return pids


def kill_tree(pid):
    for p in reversed(process_tree(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@contextlib.contextmanager
def two_nodes(node_dirs, script_args, log_name, module=False):
    """Start node 0 and node 1: torchrun in node_dirs[R] running `script_args` (a script and its
    arguments, or with module=True a module importable from ROOT and its arguments), output to
    node_dirs[R]/log_name. Yields the two launchers (Popen); on leaving, every process of both is killed."""
    port = str(distributed.free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    launchers = []
    try:
        for rank, folder in enumerate(node_dirs):
            folder.mkdir(exist_ok=True)
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                       "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                       "--max_restarts", "0", *(["--module"] if module else []), *script_args]
            with open(folder / log_name, "w") as log:
                launchers.append(subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT))
        yield launchers
    finally:
        for launcher in launchers:
            if launcher.poll() is None:  # not yet reaped: its pid cannot belong to another process yet
                kill_tree(launcher.pid)
            launcher.wait()


def run_two_nodes(node_dirs, script_args, log_name, module=False):
    """Both nodes to the end: asserts that both launchers exit 0."""
    with two_nodes(node_dirs, script_args, log_name, module) as launchers:
        for launcher, folder in zip(launchers, node_dirs):
            assert launcher.wait(timeout=LAUNCH_TIMEOUT_S) == 0, (folder / log_name).read_text()[-3000:]


def written(folder):
    """{path relative to `folder`: modification time} of every file under it but the launchers' logs."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            if os.path.dirname(path) != str(folder) or not name.endswith(".log"):
                found[os.path.relpath(path, folder)] = os.stat(path).st_mtime_ns
    return found


def report(path):
    """An evaluation.py JSON report without its provenance (the command lines differ)."""
    scores = json.loads(path.read_text())
    del scores["provenance"]
    return scores


@pytest.fixture(scope="module")
def resumed(synth, tmp_path_factory):
    """The README's two-node run, node 1 killed mid-epoch 1, then --resume latest on both nodes.

    Returns what the tests look at: the node folders, node 0's launcher (exit code, seconds from the kill
    to its exit, output) in the killed session, and what each node had written after that session.
    """
    root = tmp_path_factory.mktemp("two_nodes")
    node0, node1 = root / "node0", root / "node1"
    script = [os.path.join(ROOT, "train.py"), *train_argv(synth), *RUN_OUTPUTS]
    with two_nodes([node0, node1], script, "killed.log") as launchers:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (node0 / "run" / "model_best.pth.tar").exists():  # written after checkpoint_0: epoch 1 next
            assert time.monotonic() < deadline and launchers[0].poll() is None, (node0 / "killed.log").read_text()
            time.sleep(0.05)
        time.sleep(0.5)  # into epoch 1 (32 steps, 3 s on an idle machine)
        kill_tree(launchers[1].pid)  # node 1 is gone: its launcher and its training process
        killed = time.monotonic()
        returncode = launchers[0].wait(timeout=LAUNCH_TIMEOUT_S)
        elapsed = time.monotonic() - killed
    after_kill = [written(node0), written(node1)]
    # every process resumes from the checkpoint (over anything rank 1 wrongly wrote: test_only_node_0_writes)
    shutil.copytree(node0 / "run", node1 / "run", dirs_exist_ok=True)
    copied = written(node1)
    run_two_nodes([node0, node1], [os.path.join(ROOT, "train.py"), "--resume", "latest", "--model_name", "run"],
                  "resumed.log")
    return types.SimpleNamespace(node0=node0, node1=node1, returncode=returncode, elapsed=elapsed,
                                 killed_log=(node0 / "killed.log").read_text(errors="replace"),
                                 after_kill=after_kill, copied=copied)


@pytest.fixture(scope="module")
def world_size_2(synth, tmp_path_factory):
    """The same options as one launch of `--world_size 2`, uninterrupted: its run folder."""
    out = tmp_path_factory.mktemp("world_size_2")
    argv = train_argv(synth) + ["--model_name", str(out / "run"), "--logger_name", str(out / "log"),
                                "--world_size", "2"]
    assert errors.run(train.main, argv) == 0
    return out / "run"


# ------------------------------------------------------------------------------------------------
# 1.-3. A lost node, the resume, and who writes


def test_a_killed_node_ends_the_run_with_one_line(resumed):
    assert resumed.returncode != 0 and resumed.elapsed < DIST_TIMEOUT_S, (resumed.returncode, resumed.elapsed)
    assert "run/checkpoint_1.pth.tar" not in resumed.after_kill[0], "the kill came after epoch 1: not mid-epoch"
    # the training process's one line; torchrun's own failure report (the process's exit code 3) follows it
    lines = [line for line in resumed.killed_log.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, resumed.killed_log[-3000:]
    assert lines[0].startswith("error: rank 0: lost contact with another training process"), lines
    assert 'train.py", line' not in resumed.killed_log  # no traceback of a training process


def test_two_nodes_resumed_end_as_one_machine_with_two_processes(resumed, world_size_2):
    """Bit for bit: weights, Adam's state, every rank's RNG state, epoch, best rsum, iterations (the
    issue asks for the weights within 1e-5)."""
    for name in FINISHED:
        assert training_state_differences(resumed.node0 / "run" / name, world_size_2 / name) == [], name


def test_only_node_0_writes(resumed):
    """Node 1 writes nothing, in the killed session (its folder stays empty) and in the resumed one (the
    copy of the run folder stays as it was); node 0 holds the checkpoints and one TensorBoard file per
    session."""
    assert resumed.after_kill[1] == {}
    assert written(resumed.node1) == resumed.copied
    files = sorted(written(resumed.node0))
    events = [f for f in files if f.startswith("run/log/events.out.tfevents.")]
    assert len(events) == 2 and sorted(set(files) - set(events)) == [f"run/{name}" for name in FINISHED], files
    for name in ("killed.log", "resumed.log"):  # the run's log lines come from rank 0 alone
        assert "options:" in (resumed.node0 / name).read_text() and "options:" not in (resumed.node1 / name).read_text()


# ------------------------------------------------------------------------------------------------
# 4. Validation and evaluation on two nodes


def test_validation_on_two_nodes_is_one_process_evaluation(resumed, synth, tmp_path):
    """Every end-of-epoch rsum node 0 logged (each node scoring a share) is what evaluation.py finds on
    dev with one process; so is model_best's best_rsum."""
    rsums = []
    for name in FINISHED:
        argv = ["--model_path", str(resumed.node0 / "run" / name), "--data_path", synth.data_path,
                "--vocab_path", synth.vocab_path, "--split", "dev", "--device", "cpu", "--threads", "1",
                "--json", str(tmp_path / f"{name}.json")]
        assert errors.run(evaluation.main, argv) == 0
        rsums.append(report(tmp_path / f"{name}.json")["rsum"])
    logged = [re.findall(r"validation .* rsum ([0-9.]+)", (resumed.node0 / name).read_text())
              for name in ("killed.log", "resumed.log")]
    assert logged == [[f"{rsums[0]:.1f}"], [f"{rsums[1]:.1f}"]]
    best = checkpoint.load_checkpoint(str(resumed.node0 / "run" / "model_best.pth.tar"))["best_rsum"]
    assert best == pytest.approx(rsums[2], abs=1e-9) and rsums[2] == max(rsums[:2])


def test_evaluation_on_two_nodes_equals_one_process(resumed, synth, tmp_path):
    """Each node scores every other shard of 10 x 10 (image x caption) pairs; node 0 gathers and writes."""
    common = ["--model_path", str(resumed.node0 / "run" / "checkpoint_1.pth.tar"), "--data_path", synth.data_path,
              "--vocab_path", synth.vocab_path, "--split", "test", "--device", "cpu", "--threads", "1",
              "--shard_size", "10"]
    assert errors.run(evaluation.main, common + ["--save_sims", str(tmp_path / "one.npy"),
                                                 "--json", str(tmp_path / "one.json")]) == 0
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    run_two_nodes([node0, node1], [os.path.join(ROOT, "evaluation.py"), *common, "--save_sims", "sims.npy",
                                   "--json", "test.json"], "evaluation.log")
    assert written(node1) == {} and sorted(written(node0)) == ["sims.npy", "test.json"]
    np.testing.assert_array_equal(np.load(node0 / "sims.npy"), np.load(tmp_path / "one.npy"))
    assert report(node0 / "test.json") == report(tmp_path / "one.json")


# ------------------------------------------------------------------------------------------------
# 5. One step and one validation on two nodes


def write_validation_buffers(rank, synth, out_dir):
    """Rank `rank` of an initialised group of two, set up as train.py sets up --world_size 2: a training
    forward and backward on its own batch (VisualSA's running statistics then differ between the ranks,
    each keeps its own on CPUs), then train.validate; its buffers before and after validating to out_dir."""
    opt = opts.parse_opt(train_argv(synth) + ["--world_size", "2"])
    vocab = deserialize_vocab(train.vocab_file(opt))
    opt.vocab_size = len(vocab)
    torch.manual_seed(opt.seed)
    model = train.distribute(SimilarityModel(opt), torch.device("cpu"))
    images, captions, lengths, _, _, _ = next(iter(data.get_train_loader(opt, vocab, distributed=True)))
    model(images, captions, lengths).sum().backward()
    buffers = {"before": {name: b.clone() for name, b in train.unwrap(model).named_buffers()}}
    val_loaders = data.get_eval_loaders(opt.data_path, opt.data_name, "dev", vocab, opt.batch_size, 0)
    no_writer = types.SimpleNamespace(add_scalar=lambda *args: None, flush=lambda: None)
    train.validate(opt, model, val_loaders, torch.device("cpu"), no_writer, 0)
    buffers["after"] = dict(train.unwrap(model).named_buffers())
    torch.save(buffers, f"{out_dir}/buffers{rank}.pt")


@pytest.fixture(scope="module")
def step_on_two_nodes(synth, tmp_path_factory):
    """This file's __main__ on each node: the folder its processes wrote to."""
    out = tmp_path_factory.mktemp("step")
    run_two_nodes([out / "node0", out / "node1"], ["tests.test_multinode", str(out), synth.data_path,
                                                   synth.vocab_path], "step.log", module=True)
    return out


def test_one_step_on_two_nodes_equals_the_original_with_pooled_statistics(step_on_two_nodes, synth):
    assert_two_process_results_equal_the_original(synth, step_on_two_nodes)


def test_validation_scores_every_share_with_rank_0s_statistics(step_on_two_nodes):
    """Each rank scores its shards of the dev matrix with its own model: with rank 0's BatchNorm statistics
    (the checkpoint's) on every rank, the gathered matrix is one process's (tests/test_train.py shows that
    for identical models). A rank's own VisualSA statistics would move its shards' scores (measured with
    10 x 10 shards after one such step: up to 7e-6)."""
    rank0, rank1 = (torch.load(step_on_two_nodes / f"buffers{rank}.pt", weights_only=True) for rank in (0, 1))
    differing = [name for name, b in rank0["before"].items() if not torch.equal(b, rank1["before"][name])]
    assert differing and all("v_global_w" in name for name in differing), differing
    for name, value in rank0["after"].items():
        assert torch.equal(value, rank0["before"][name]) and torch.equal(rank1["after"][name], value), name


if __name__ == "__main__":  # one node's process of step_on_two_nodes, started by torchrun: OUT DATA_PATH VOCAB_PATH
    out_dir, data_path, vocab_path = sys.argv[1:]
    node_rank, paths = int(os.environ["RANK"]), types.SimpleNamespace(data_path=data_path, vocab_path=vocab_path)
    distributed.init_group(node_rank, 2, "env://", "cpu", DIST_TIMEOUT_S, threads=1)
    try:
        write_step_results(node_rank, paths, out_dir)
        write_validation_buffers(node_rank, paths, out_dir)
    finally:
        dist.destroy_process_group()
