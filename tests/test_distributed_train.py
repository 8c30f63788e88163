"""Distributed supernet training on a real private Ray cluster (`local:N`): N workers sharing each
global batch end with the weights one process gets, and a killed worker is survived."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nestnas.errors import ClusterError, ConfigError
from nestnas.supernet import SearchSpace, StageSpec, build_supernet
from nestnas.supernet.checkpoint import load_supernet, read_checkpoint
from nestnas.supernet.data import digits_datasets
from nestnas.supernet.distributed import KillWorker, train_distributed
from nestnas.supernet.train import TrainOptions, train_supernet

pytest.importorskip("ray")

# the default family (cnn, with batch norm in every block), kept tiny so that a step is quick
TINY_CNN = SearchSpace.mobilenet(stages=(StageSpec(8, 2, (1, 2)), StageSpec(16, 2, (1, 2))), kernel_choices=(3, 5),
                                 expand_choices=(2, 3), width_choices=(0.5, 1.0), resolution_choices=(8, 12),
                                 stem_channels=8, head_channels=32)


def digits_loader(n=96, batch_size=32):
    """Digits in float64: AdamW divides by sqrt(v), so a gradient that is zero up to float32
    rounding (a batch-norm bias before the next batch norm) turns summation order into steps of
    the size of the learning rate; in float64 the comparison checks the arithmetic itself."""
    train, _ = digits_datasets("cnn")
    data = TensorDataset(train.tensors[0][:n].double(), train.tensors[1][:n])
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def make_cnn():
    torch.manual_seed(0)
    assert TINY_CNN.family == SearchSpace.for_family("cnn").family
    return build_supernet(TINY_CNN, num_classes=10, in_channels=1).double()


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if x.is_floating_point())


def test_no_cluster_and_no_ray_cluster_needed_are_one_line():
    import ray

    assert not ray.is_initialized()
    net, loader = make_cnn(), digits_loader(n=32)
    with pytest.raises(ConfigError, match="needs a Ray cluster"):
        train_supernet(net, loader, epochs=1, workers=2, progress=False)
    with pytest.raises(ClusterError, match="no Ray cluster answers"):
        train_supernet(net, loader, epochs=1, workers=1, ray_address="127.0.0.1:1", progress=False)


@pytest.fixture(scope="module")
def cluster():
    """One private two-CPU cluster for the tests below (train_distributed joins it as it is)."""
    from nestnas.raycluster import connect

    with connect("local:2") as ray:
        yield ray


def test_two_workers_match_one_process(tmp_path, cluster):
    loader = digits_loader(n=88)  # batches of 32, 32 and 24: the last one splits 12/12
    one = make_cnn()
    train_supernet(one, loader, epochs=1, seed=1, progress=False)
    out = tmp_path / "two.ckpt"
    two = make_cnn()
    result = train_supernet(two, loader, epochs=1, seed=1, progress=False, ray_address="local:2", workers=2,
                            checkpoint=out)
    assert max_diff(one, two) <= 1e-5
    assert result.restarts == 0 and len(result.history) == 1
    # the out checkpoint is the one-process format, readable by search/eval, with the run's state
    payload = read_checkpoint(out)
    assert all(torch.equal(payload["model"][k], v) for k, v in two.state_dict().items())
    assert payload["train"]["epoch"] == 1 and payload["train"]["history"] == result.history
    assert load_supernet(out).family == "cnn"
    assert not (tmp_path / ".two.ckpt.ray").exists()  # Ray's storage goes with the run


def test_bad_worker_counts_are_one_line(cluster):
    net, loader = make_cnn(), digits_loader(n=32)
    with pytest.raises(ConfigError, match="at least 1, got 0"):
        train_supernet(net, loader, epochs=1, workers=0, ray_address="local:2", progress=False)
    with pytest.raises(ClusterError, match="--workers 3 needs 3 CPUs, but the Ray cluster has 2"):
        train_supernet(net, loader, epochs=1, workers=3, ray_address="local:2", progress=False)


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_with_the_same_result(tmp_path, cluster):
    loader = digits_loader(n=96)
    opts = TrainOptions(epochs=3, seed=2)
    straight = make_cnn()
    train_distributed(straight, loader, opts, address="local:2", workers=2, progress=False)
    killed = make_cnn()
    result = train_distributed(killed, loader, opts, address="local:2", workers=2, progress=False,
                               checkpoint=tmp_path / "k.ckpt", fault=KillWorker(rank=1, epoch=2, batch=1))
    assert result.restarts == 1 and result.restart_epochs == [1]
    assert [m["epoch"] for m in result.history] == [1, 2, 3]
    assert max_diff(straight, killed) <= 1e-6


@pytest.mark.slow
def test_a_run_that_dies_leaves_its_last_epoch_in_the_checkpoint_and_a_rerun_resumes_it(tmp_path, cluster):
    loader, out = digits_loader(n=96), tmp_path / "d.ckpt"
    opts = TrainOptions(epochs=3, seed=5)
    straight = make_cnn()
    train_distributed(straight, loader, opts, address="local:2", workers=2, progress=False)
    with pytest.raises(ClusterError, match="distributed training failed"):  # no restarts allowed: the run dies
        train_distributed(make_cnn(), loader, opts, address="local:2", workers=2, progress=False, checkpoint=out,
                          max_failures=0, fault=KillWorker(rank=0, epoch=2, batch=1))
    assert read_checkpoint(out)["train"]["epoch"] == 1  # copied from Ray's checkpoint while the run lasted
    resumed = make_cnn()
    result = train_distributed(resumed, loader, opts, address="local:2", workers=2, progress=False, checkpoint=out)
    assert result.resumed_from_epoch == 1 and [m["epoch"] for m in result.history] == [1, 2, 3]
    assert max_diff(straight, resumed) <= 1e-6


def test_cli_workers_without_ray_is_one_line(tmp_path):
    from nestnas.cli import main

    assert main(["train", "--out", str(tmp_path / "x.ckpt"), "--workers", "2"]) == 1
    assert not (tmp_path / "x.ckpt").exists()


def test_cli_ray_without_ray_installed_names_the_extra(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None  # as if Ray were not installed\n"
            "from nestnas.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--out", str(tmp_path / "x.ckpt"), "--ray", "local:2",
                           "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ['error: --ray needs Ray, which is not installed; install the extra: '
                                                'pip install -e ".[ray]"']


class _Stop(Exception):
    pass


def _stop_after_first(epoch, metrics):
    raise _Stop


@pytest.mark.slow
def test_distributed_run_resumes_a_one_process_checkpoint(tmp_path, cluster):
    loader, out = digits_loader(n=64), tmp_path / "r.ckpt"
    straight = make_cnn()
    train_supernet(straight, loader, epochs=2, seed=4, progress=False)
    with pytest.raises(_Stop):  # one process stops after epoch 1 of 2 (its checkpoint is written first)
        train_supernet(make_cnn(), loader, epochs=2, seed=4, progress=False, checkpoint=out,
                       callbacks=[_stop_after_first])
    resumed = build_supernet(TINY_CNN, num_classes=10, in_channels=1).double()  # weights come from the file
    result = train_supernet(resumed, loader, epochs=2, seed=4, progress=False, checkpoint=out,
                            ray_address="local:2", workers=2)
    assert result.resumed_from_epoch == 1 and [m["epoch"] for m in result.history] == [1, 2]
    assert max_diff(straight, resumed) <= 1e-5
    assert read_checkpoint(out)["train"]["epoch"] == 2
