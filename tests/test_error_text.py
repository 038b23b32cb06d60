"""Short errors keep their key part (issue 29, finding 6): no line is cut inside a word, a failed download names its
cause, a misspelt config name gets its close match, and an option under a list (``--trainer.logger.0...``) is
reported as it was given."""
from __future__ import annotations

import socket
import urllib.error

import pytest

from tplightning._lightning import pl
from tplightning.cli import report
from tplightning.config_files import available_configs
from tplightning.data import cifar10, mnist
from tplightning.errors import HINT, MissingDataError, short_message
from train import main

NO_NETWORK = urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))


def _printed(capsys, args) -> str:
    with pytest.raises(SystemExit) as info:
        report(main, list(args))
    assert info.value.code == 2
    return capsys.readouterr().err.strip()


def test_a_long_line_is_printed_whole():
    text = "files missing from " + "/a/long/folder" * 30 + ". Download failed: no network"
    assert len(text) > 400
    assert short_message(MissingDataError(text)) == f"error: {text}\n{HINT}"


def test_a_huge_line_ends_between_words():
    words = " ".join(f"word{i:04d}" for i in range(1000))  # 9,000 characters
    first = short_message(MissingDataError(words)).splitlines()[0]
    kept = first.split(" ... (")[0]
    assert first.startswith("error: word0000 word0001") and len(first) < 2100
    assert kept.split()[-1] in words.split()  # the last word shown is a whole word
    assert first.endswith(f"({len('error: ' + words) - len(kept)} more characters; --traceback shows them)")


def test_a_failed_mnist_download_names_its_cause(capsys, monkeypatch, tmp_path):
    def offline(url, dest):
        raise NO_NETWORK

    monkeypatch.setattr(mnist, "download_file", offline)
    monkeypatch.delenv("TPLIGHTNING_NO_DOWNLOAD", raising=False)
    err = _printed(capsys, ["--config", "mnist/bp.yaml", "--data.init_args.data_dir", str(tmp_path), "--trainer.logger", "false"])
    first = err.splitlines()[0]
    assert first.startswith("error: MNIST download failed: https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz: "
                            "no network (the host name cannot be resolved: Name or service not known)"), err
    assert first.endswith("or point TPLIGHTNING_DATA (or --data.init_args.data_dir) at a folder that has them."), err


def test_a_failed_cifar10_download_names_its_cause(monkeypatch, tmp_path):
    def offline(url, dest):
        raise NO_NETWORK

    monkeypatch.setattr(mnist, "download_file", offline)
    monkeypatch.delenv("TPLIGHTNING_NO_DOWNLOAD", raising=False)
    with pytest.raises(MissingDataError) as info:
        cifar10.CIFAR10DataModule(str(tmp_path)).prepare_data()
    first = short_message(info.value).splitlines()[0]
    assert first.startswith(f"error: CIFAR-10 download failed: {cifar10.URL}: no network (the host name cannot be resolved: "
                            "Name or service not known). CIFAR-10 files missing from"), first
    assert first.endswith("at a folder that has them."), first


@pytest.mark.parametrize("err, cause", [
    (urllib.error.HTTPError("https://x/y", 403, "Forbidden", None, None), "the server answered HTTP 403 Forbidden"),
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "no connection to the server ([Errno 111] Connection refused)"),
    (TimeoutError("timed out"), "the connection timed out (timed out)"),
    (PermissionError(13, "Permission denied"), "PermissionError: [Errno 13] Permission denied"),
])  # fmt: skip
def test_download_causes_in_words(err, cause):
    assert mnist.download_cause(err) == cause


def test_a_misspelt_config_gets_its_close_match_and_the_whole_list(capsys):
    err = _printed(capsys, ["--config", "dpt.yaml"])
    first = err.splitlines()[0]
    assert "); did you mean dtp.yaml? available: ao_sdtp.yaml, " in first, err
    assert first.endswith(", ".join(available_configs()[-3:])), err  # the list is not cut
    assert "did you mean mnist/bp.yaml? available" in _printed(capsys, ["--config", "configs/mnist/bpp.yaml"])


def test_an_indexed_logger_option_is_reported_as_given(capsys):
    err = _printed(capsys, ["--config", "dtp.yaml", "--trainer.logger.0.init_args.name", "X"])
    assert err.splitlines() == [
        "error: --trainer.logger.0.init_args.name: no such option",
        "  an index cannot pick an item of --trainer.logger: --trainer.logger.init_args.name sets it for the last item "
        f"({pl.__name__}.loggers.TensorBoardLogger); to change another item, give the whole list in a config file",
        "  given: X",
        HINT,
    ], err
