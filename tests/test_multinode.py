"""Several machines, shown on one (issue 21): two `torchrun` launchers on localhost act as two nodes.

Each node is `torchrun --nnodes 2 --node_rank R --nproc_per_node 1` with a static master on a free
loopback port (node 0's launcher hosts the rendezvous), gloo on the CPU, and its own working directory
with relative output paths, as two machines have two disks. Shown here:

1. Two nodes train the synthetic data for two epochs to the weights of a `--world_size 2` run of the same
   options; only node 0 (global rank 0) writes checkpoints, TensorBoard logs and model_best, and its
   validations are what one process's evaluation finds.
2. SAF's gate statistics are pooled across the nodes: one training step of two nodes against the
   restatement of the original's 2-process step (tests/test_equivalence.py, from the maths).
3. Killing node 1 mid-epoch ends node 0 within --dist_timeout, its training process saying so in one line;
   `--resume latest` on both nodes (the run folder shared, as a cluster's filesystem) then ends exactly
   where the uninterrupted run ends.
4. evaluation.py on two nodes gives one process's numbers and matrix.

Every process runs one thread (float sums depend on the thread count), every launch has a timeout, and
every launcher and training process is killed if a test fails. Run as a script (by torchrun, in 2.) this
file is one node's process of the training step.
"""
import contextlib
import json
import os
import re
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
from distributed import free_port
from model import SimilarityModel
from vocab import deserialize_vocab
from tests.conftest import ROOT
from tests.test_equivalence import assert_two_process_results_equal_the_original, ddp_worker
from tests.test_reliability import training_state_differences

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DIST_TIMEOUT_S = 30
LAUNCH_TIMEOUT_S = 180  # a launch takes ~15 s on two busy cores; a hang ends the test, not CI
TINY_RUN = ["--img_dim", "64", "--word_dim", "8", "--embed_size", "16", "--sim_dim", "8", "--module_name", "SAF",
            "--batch_size", "16", "--num_epochs", "2", "--learning_rate", "0.005", "--warmup_epochs", "1",
            "--daa_weight", "1", "--seed", "0", "--device", "cpu", "--threads", "1",
            "--dist_timeout", str(DIST_TIMEOUT_S)]
RUN_OUTPUTS = ["--model_name", "run", "--logger_name", "run/log"]  # relative: in each node's own folder
FINAL = "checkpoint_1.pth.tar"


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
def two_nodes(node_dirs, script_args, module=False):
    """Start node 0 and node 1: torchrun in node_dirs[R] running train.py-like `script_args` (the script,
    or with module=True a module run from ROOT, then its arguments). Yields the two launchers (Popen, their
    output in node_dirs[R]/launcher.log); on leaving, every process of both launches is killed."""
    port = str(free_port())
    launchers = []
    try:
        for rank, folder in enumerate(node_dirs):
            folder.mkdir(exist_ok=True)
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                       "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                       "--max_restarts", "0", *(["--module"] if module else []), *script_args]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                       PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
            with open(folder / "launcher.log", "w") as log:
                launchers.append(subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT))
        yield launchers
    finally:
        for launcher in launchers:
            if launcher.poll() is None:  # not yet reaped: its pid cannot belong to another process yet
                kill_tree(launcher.pid)
            launcher.wait()


def run_two_nodes(node_dirs, script_args, module=False):
    """Both nodes to the end: asserts that both launchers exit 0."""
    with two_nodes(node_dirs, script_args, module) as launchers:
        for launcher, folder in zip(launchers, node_dirs):
            assert launcher.wait(timeout=LAUNCH_TIMEOUT_S) == 0, (folder / "launcher.log").read_text()[-3000:]


def output(folder):
    return (folder / "launcher.log").read_text(errors="replace")


def outputs_of(folder):
    """Every file under `folder` but the launcher's log, relative to it, sorted."""
    found = [os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names]
    return sorted(f for f in found if f != "launcher.log")


def assert_same_weights(path_a, path_b, atol):
    states = [checkpoint.load_checkpoint(str(path))["model"] for path in (path_a, path_b)]
    for a, b in zip(*states):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def report(path):
    """An evaluation.py JSON report without its provenance (the command lines differ)."""
    scores = json.loads(path.read_text())
    del scores["provenance"]
    return scores


@pytest.fixture(scope="module")
def uninterrupted(synth, tmp_path_factory):
    """The two-node run, 2 epochs: the folder holding node0/ and node1/, each node's working directory."""
    root = tmp_path_factory.mktemp("two_nodes")
    run_two_nodes([root / "node0", root / "node1"], [os.path.join(ROOT, "train.py"), *train_argv(synth),
                                                     *RUN_OUTPUTS])
    return root


# ------------------------------------------------------------------------------------------------
# 1. Two nodes train as --world_size 2, and only node 0 writes


def test_two_nodes_train_as_one_machine_with_two_processes(uninterrupted, synth, tmp_path):
    node0, node1 = uninterrupted / "node0", uninterrupted / "node1"
    argv = train_argv(synth) + ["--model_name", str(tmp_path / "run"), "--logger_name", str(tmp_path / "log"),
                                "--world_size", "2"]
    assert errors.run(train.main, argv) == 0
    assert_same_weights(node0 / "run" / FINAL, tmp_path / "run" / FINAL, atol=1e-5)

    assert outputs_of(node1) == []  # rank 1 wrote nothing: no folder, checkpoint or log
    written = outputs_of(node0)
    events = [f for f in written if f.startswith("run/log/events.out.tfevents.")]
    assert len(events) == 1, written  # one TensorBoard writer
    assert sorted(set(written) - set(events)) == ["run/checkpoint_0.pth.tar", "run/checkpoint_1.pth.tar",
                                                  "run/model_best.pth.tar"]
    assert "options:" in output(node0) and "options:" not in output(node1)  # the run's log lines: rank 0's


def test_validation_on_two_nodes_is_one_process_evaluation(uninterrupted, synth, tmp_path):
    """Every end-of-epoch rsum train.py validated on two nodes (each node scoring a share) is what
    evaluation.py finds on dev with one process, in node 0's log and as model_best's best_rsum."""
    folder = uninterrupted / "node0" / "run"
    rsums = []
    for name in ("checkpoint_0.pth.tar", "checkpoint_1.pth.tar", "model_best.pth.tar"):
        argv = ["--model_path", str(folder / name), "--data_path", synth.data_path, "--vocab_path", synth.vocab_path,
                "--split", "dev", "--device", "cpu", "--threads", "1", "--json", str(tmp_path / f"{name}.json")]
        assert errors.run(evaluation.main, argv) == 0
        rsums.append(report(tmp_path / f"{name}.json")["rsum"])
    logged = re.findall(r"validation .* rsum ([0-9.]+)", output(uninterrupted / "node0"))
    assert logged == [f"{rsum:.1f}" for rsum in rsums[:2]]
    assert checkpoint.load_checkpoint(str(folder / "model_best.pth.tar"))["best_rsum"] == pytest.approx(rsums[2],
                                                                                                     abs=1e-9)


def validating_worker(rank, init_method, synth, out_dir):
    """One of two gloo processes as --world_size 2 sets them up: a training forward and backward on its own
    batch (VisualSA's running statistics then differ between the ranks), then train.validate; writes its
    buffers before and after validating to out_dir/buffers{rank}.pt."""
    distributed.init_group(rank, 2, init_method, "cpu", timeout_s=DIST_TIMEOUT_S, threads=1)
    try:
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
    finally:
        dist.destroy_process_group()


def test_validation_scores_every_share_with_rank_0s_statistics(synth, tmp_path):
    """Each rank scores its shards of the dev matrix with its own model: with rank 0's BatchNorm statistics
    (the checkpoint's) on every rank, the gathered matrix is one process's (tests/test_train.py shows that
    for identical models). A rank's own VisualSA statistics would move its shards' scores (measured with
    10 x 10 shards after one such step: up to 7e-6)."""
    torch.multiprocessing.spawn(validating_worker, args=(f"tcp://127.0.0.1:{free_port()}", synth, str(tmp_path)),
                                nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"buffers{rank}.pt", weights_only=True) for rank in (0, 1))
    differing = [name for name, b in rank0["before"].items() if not torch.equal(b, rank1["before"][name])]
    assert differing and all("v_global_w" in name for name in differing), differing
    for name, value in rank0["after"].items():
        assert torch.equal(value, rank0["before"][name]) and torch.equal(rank1["after"][name], value), name


# ------------------------------------------------------------------------------------------------
# 2. SAF's statistics pooled across the nodes


def test_one_step_on_two_nodes_equals_the_original_with_pooled_statistics(synth, tmp_path):
    """This file run as a script on each node (the __main__ block below): train.py's distributed set-up and
    one step per configuration, against the restatement of the original's 2-process step."""
    run_two_nodes([tmp_path / "node0", tmp_path / "node1"],
                  ["tests.test_multinode", str(tmp_path), synth.data_path, synth.vocab_path], module=True)
    assert_two_process_results_equal_the_original(synth, tmp_path)


# ------------------------------------------------------------------------------------------------
# 3. A lost node, then a resume on both


def test_a_killed_node_ends_the_run_and_both_resume_to_the_uninterrupted_weights(uninterrupted, synth, tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    (node0 / "run").mkdir(parents=True)
    node1.mkdir()
    os.symlink(node0 / "run", node1 / "run")  # the run folder on a filesystem both nodes share
    script = [os.path.join(ROOT, "train.py"), *train_argv(synth), *RUN_OUTPUTS]
    with two_nodes([node0, node1], script) as launchers:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (node0 / "run" / "model_best.pth.tar").exists():  # written after checkpoint_0: epoch 1 next
            assert time.monotonic() < deadline and launchers[0].poll() is None, output(node0)[-3000:]
            time.sleep(0.05)
        time.sleep(0.5)  # into epoch 1 (~3 s of 32 steps)
        kill_tree(launchers[1].pid)  # node 1 is gone: its launcher and its training process
        killed = time.monotonic()
        returncode = launchers[0].wait(timeout=LAUNCH_TIMEOUT_S)
        elapsed = time.monotonic() - killed
    log = output(node0)
    assert returncode != 0 and elapsed < DIST_TIMEOUT_S, (returncode, elapsed)
    assert not (node0 / "run" / FINAL).exists(), "the kill came after epoch 1: not mid-epoch"
    # the training process's one line; torchrun's own failure report (its exit code 3) follows it
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: lost contact with another training process"), log
    assert "train.py\", line" not in log  # no traceback of a training process

    run_two_nodes([node0, node1], [os.path.join(ROOT, "train.py"), "--resume", "latest", "--model_name", "run"])
    assert training_state_differences(node0 / "run" / FINAL, uninterrupted / "node0" / "run" / FINAL) == []
    events = [f for f in outputs_of(node0) if "tfevents" in f]
    assert len(events) == 2, events  # one writer in each session, both node 0's


# ------------------------------------------------------------------------------------------------
# 4. Evaluation on two nodes


def test_evaluation_on_two_nodes_equals_one_process(uninterrupted, synth, tmp_path):
    """Each node scores every other shard of 10 x 10 (image x caption) pairs; node 0 gathers and writes."""
    ckpt = str(uninterrupted / "node0" / "run" / FINAL)
    common = ["--model_path", ckpt, "--data_path", synth.data_path, "--vocab_path", synth.vocab_path,
              "--split", "test", "--device", "cpu", "--threads", "1", "--shard_size", "10"]
    assert errors.run(evaluation.main, common + ["--save_sims", str(tmp_path / "one.npy"),
                                                 "--json", str(tmp_path / "one.json")]) == 0
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    run_two_nodes([node0, node1], [os.path.join(ROOT, "evaluation.py"), *common, "--save_sims", "sims.npy",
                                   "--json", "test.json"])
    assert outputs_of(node1) == [] and outputs_of(node0) == ["sims.npy", "test.json"]
    np.testing.assert_array_equal(np.load(node0 / "sims.npy"), np.load(tmp_path / "one.npy"))
    assert report(node0 / "test.json") == report(tmp_path / "one.json")


if __name__ == "__main__":  # one node's process of test 2, started by torchrun: OUT_DIR DATA_PATH VOCAB_PATH
    out_dir, data_path, vocab_path = sys.argv[1:]
    ddp_worker(int(os.environ["RANK"]), "env://", types.SimpleNamespace(data_path=data_path, vocab_path=vocab_path),
               out_dir)
