"""Loading with bad input: a Hugging Face id with no network, broken or missing model folders, devices that are
not there, adapter configs with wrong value types. Each is one ModelLoadError / AdapterError / UsageError line,
at once."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from huggingface_hub import constants as hf_constants
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from maskspec import cli, hub
from maskspec.adapter import CONFIG_FILE, load_adapter, read_adapter_config
from maskspec.errors import AdapterError, ModelLoadError, UsageError
from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
from maskspec.testing import tiny_model

MISSING_ID = "someorg/not-here"


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the 128 ids of the tiny models ("w5 w6" -> [5, 6])."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _save_tiny_model(folder) -> None:
    tiny_model("llama").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder (weights + tokenizer) and an adapter for it with decoding defaults."""
    root = tmp_path_factory.mktemp("tiny")
    _save_tiny_model(root / "model")
    base, tokenizer = hub.load_model_and_tokenizer(str(root / "model"))
    mtp = randomize_adapter_(MTPModel(base, tokenizer, MTPConfig(k=3, rank=4)), seed=1)
    mtp.save_adapter(root / "adapter")
    cfg = json.loads((root / "adapter" / CONFIG_FILE).read_text())
    cfg["decoding"] = {"cpu": {"k": 2, "measured": "by hand"}, "cuda": {"measured": "no k here"}}
    (root / "adapter" / CONFIG_FILE).write_text(json.dumps(cfg))
    return root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a hub that refuses connections."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hf-cache"


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------- Hugging Face ids


@pytest.mark.parametrize("endpoint", ["refused", "https://nonexistent.invalid"])  # closed port, DNS failure
def test_missing_hub_id_fails_at_once_without_network(no_network, monkeypatch, endpoint):
    if endpoint != "refused":
        monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        hub.load_model_and_tokenizer(MISSING_ID)
    assert time.perf_counter() - start < 5.0  # huggingface_hub alone retries for ~30 s
    message = str(info.value)
    assert "\n" not in message and "not in the Hugging Face cache" in message and "cannot be reached" in message
    assert f"hf download {MISSING_ID}" in message and "HF_HUB_OFFLINE=1" in message and "'default'" in message


def test_missing_hub_id_with_offline_mode_does_not_probe(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("probed the network in offline mode"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set; download it where there is network"):
        hub.load_model_and_tokenizer(MISSING_ID)


def test_cli_missing_hub_id_is_one_line(no_network, capsys):
    start = time.perf_counter()
    line = _one_line_error(capsys, ["generate", "--model", MISSING_ID, "hi"])
    assert time.perf_counter() - start < 10.0
    assert line.startswith(f"error: model '{MISSING_ID}' is not in the Hugging Face cache")


def test_invalid_hub_id_is_one_line(no_network):
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a Hugging Face id"):
        hub.load_model_and_tokenizer("a/b/c")


def test_cached_hub_id_loads_without_network(no_network, monkeypatch):
    # The layout huggingface_hub writes: refs/main names the snapshot folder that holds the files.
    repo = no_network / "models--someorg--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    _save_tiny_model(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("probed the network for a cached id"))
    model, tokenizer = hub.load_model_and_tokenizer("someorg/tiny")
    assert model.config.vocab_size == 128 and tokenizer("w5 w6").input_ids == [5, 6]

    (snapshot / "model.safetensors").unlink()
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(ModelLoadError, match=r"only partly in the Hugging Face cache \(.*model.safetensors"):
        hub.load_model_and_tokenizer("someorg/tiny")


class _NotFound(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args) -> None:
        pass


def test_unknown_id_on_a_reachable_hub_is_one_line(tmp_path):
    """A hub that answers 404: one line at once (no retries), naming the id and what to check."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and "OFFLINE" not in k}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HUB_CACHE=str(tmp_path / "cache"))
    try:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "maskspec.cli", "generate", "hi", "--model", MISSING_ID,
                               "--mode", "ar"], capture_output=True, text=True, timeout=120, env=env)
        elapsed = time.perf_counter() - start
    finally:
        server.shutdown()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot load model '{MISSING_ID}'" in errors[0] and "check the id" in errors[0]
    assert "Retrying" not in proc.stderr and elapsed < 60


def test_hub_probe(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "no_proxy",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert hub.hub_reachable(f"http://127.0.0.1:{port}")
        assert not hub.hub_reachable(f"http://127.0.0.1:{_closed_port()}")
        # Requests go through a proxy: the proxy is what has to answer, not the hub's own name.
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        assert hub.hub_reachable("https://nonexistent.invalid")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{_closed_port()}")
    assert not hub.hub_reachable("https://nonexistent.invalid")


def test_hub_probe_gives_up_on_a_hanging_lookup(monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("timed out")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    try:
        start = time.perf_counter()
        assert not hub.hub_reachable("https://huggingface.co", timeout=0.3)
        assert time.perf_counter() - start < 2.0
    finally:
        release.set()


# ---------------------------------------------------------------- local folders


@pytest.mark.parametrize("case", ["empty", "no-config", "file", "absolute", "relative", "parent", "home"])
def test_bad_model_folder_is_one_line(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("a local path went to the hub"))
    if case == "empty":
        (tmp_path / "m").mkdir()
        arg, expected = str(tmp_path / "m"), "is empty"
    elif case == "no-config":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.safetensors").write_bytes(b"x")
        arg, expected = str(tmp_path / "m"), "has no config.json"
    elif case == "file":
        (tmp_path / "model.safetensors").write_bytes(b"x")
        arg, expected = str(tmp_path / "model.safetensors"), "is a file, not a folder"
    else:
        arg = {"absolute": str(tmp_path / "gone"), "relative": "./gone", "parent": "../gone", "home": "~/gone"}[case]
        expected = "does not exist"
    with pytest.raises(ModelLoadError) as info:
        hub.load_model_and_tokenizer(arg)
    message = str(info.value)
    assert "\n" not in message and arg in message and expected in message


def test_cli_empty_model_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    line = _one_line_error(capsys, ["generate", "--model", str(tmp_path / "m"), "hi"])
    assert line == (f"error: model folder {tmp_path / 'm'} is empty; a Hugging Face model folder holds config.json, "
                    "the weights and the tokenizer (write one with save_pretrained, or `hf download ID --local-dir "
                    "FOLDER`)")


def _break_config(key, value):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])


def _remove_tokenizer(folder):
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()


BROKEN_FOLDERS = {
    "config not JSON": (lambda f: (f / "config.json").write_text("{nope"), "not a valid JSON file"),
    "config not an object": (lambda f: (f / "config.json").write_text("[1]"), "model_type"),
    "unknown model type": (_break_config("model_type", "no-such-arch"), "no-such-arch"),
    "hidden_size a string": (_break_config("hidden_size", "x"), "hidden_size"),
    "weights of another shape": (_break_config("intermediate_size", 96), "ignore_mismatched_sizes"),
    "weights truncated": (_truncate_weights, "deserializing header"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
    "no tokenizer": (_remove_tokenizer, "has no tokenizer files"),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_broken_model_folder_is_one_line(files, tmp_path, case):
    folder = tmp_path / "m"
    shutil.copytree(files / "model", folder)
    edit, expected = BROKEN_FOLDERS[case]
    edit(folder)
    with pytest.raises(ModelLoadError) as info:
        hub.load_model_and_tokenizer(str(folder))
    message = str(info.value)
    assert "\n" not in message and str(folder) in message and expected in message


def test_interrupt_while_loading_is_not_an_error(files, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.load_model_and_tokenizer(str(files / "model"))


@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:7", "gpu0"])
def test_bad_device_is_a_usage_error(files, device):
    if (device == "cuda" and torch.cuda.is_available()) or (device == "cuda:7" and torch.cuda.device_count() > 7):
        pytest.skip("this machine has that GPU")
    with pytest.raises(UsageError, match=f"device '{device}'"):
        hub.load_model_and_tokenizer(str(files / "model"), device=device)
    with pytest.raises(UsageError, match=f"device '{device}'"):
        MTPModel.from_pretrained(str(files / "model"), adapter=str(files / "adapter"), device=device)


# ---------------------------------------------------------------- adapter configs


def _drop(key):
    return lambda cfg: cfg.pop(key)


def _set(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


# (edit of adapter_config.json, the field the error must name)
BAD_ADAPTER_CONFIGS = {
    "k a string": (_set("k", "eight"), "k"),
    "k zero": (_set("k", 0), "k"),
    "k negative": (_set("k", -2), "k"),
    "k a bool": (_set("k", True), "k"),
    "k a float": (_set("k", 3.0), "k"),
    "rank a float": (_set("rank", 2.5), "rank"),
    "rank zero": (_set("rank", 0), "rank"),
    "alpha a string": (_set("alpha", "x"), "alpha"),
    "alpha NaN": (_set("alpha", float("nan")), "alpha"),
    "dropout above 1": (_set("dropout", 1.5), "dropout"),
    "dropout null": (_set("dropout", None), "dropout"),
    "target_modules a string": (_set("target_modules", "q_proj"), "target_modules"),
    "target_modules empty": (_set("target_modules", []), "target_modules"),
    "target_modules of ints": (_set("target_modules", [1, 2]), "target_modules"),
    "sampler_shape null": (_set("sampler_shape", None), "sampler_shape"),
    "sampler_shape too short": (_set("sampler_shape", [64, 32]), "sampler_shape"),
    "hidden_size a string": (_set("hidden_size", "32"), "hidden_size"),
    "base_model a number": (_set("base_model", 7), "base_model"),
    "base_fingerprint null": (_set("base_fingerprint", None), "base_fingerprint"),
    "training a list": (_set("training", []), "training"),
    "decoding a list": (_set("decoding", []), "decoding"),
    "decoding entry a string": (_set("decoding", {"cpu": "fast"}), "decoding.cpu"),
    "decoding k zero": (_set("decoding", {"cpu": {"k": 0}}), "decoding.cpu.k"),
    "decoding k above k": (_set("decoding", {"cpu": {"k": 4}}), "decoding.cpu.k"),
    "decoding k a string": (_set("decoding", {"cuda": {"k": "2"}}), "decoding.cuda.k"),
    "rank missing": (_drop("rank"), "rank"),
}


@pytest.fixture
def bad_adapter(files, tmp_path, request):
    edit, field = BAD_ADAPTER_CONFIGS[request.param]
    folder = tmp_path / "adapter"
    shutil.copytree(files / "adapter", folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    edit(cfg)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    return folder, field


def _check_adapter_error(info, folder, field) -> None:
    message = str(info.value)
    assert "\n" not in message and str(folder / CONFIG_FILE) in message and f"'{field}'" in message


@pytest.mark.parametrize("bad_adapter", list(BAD_ADAPTER_CONFIGS), indirect=True)
def test_bad_adapter_config_is_one_line(files, bad_adapter):
    folder, field = bad_adapter
    with pytest.raises(AdapterError) as info:
        read_adapter_config(folder)
    _check_adapter_error(info, folder, field)
    with pytest.raises(AdapterError) as info:
        MTPModel.from_pretrained(str(files / "model"), adapter=str(folder))
    _check_adapter_error(info, folder, field)
    base, tokenizer = hub.load_model_and_tokenizer(str(files / "model"))
    with pytest.raises(AdapterError) as info:
        load_adapter(MTPModel(base, tokenizer, MTPConfig(k=3, rank=4)), folder)
    _check_adapter_error(info, folder, field)


@pytest.mark.parametrize("bad_adapter", ["k a string", "decoding a list"], indirect=True)
def test_cli_bad_adapter_config_is_one_line(files, bad_adapter, capsys):
    folder, field = bad_adapter
    line = _one_line_error(capsys, ["generate", "--model", str(files / "model"), "--adapter", str(folder), "w5"])
    assert line.startswith(f"error: {folder / CONFIG_FILE}: field '{field}' must be")


def test_valid_adapter_still_loads(files, tmp_path):
    mtp = MTPModel.from_pretrained(str(files / "model"), adapter=str(files / "adapter"))
    assert (mtp.k, mtp.config.rank, mtp.default_k) == (3, 4, 2)  # decoding.cpu.k
    saved = read_adapter_config(files / "adapter")
    assert isinstance(saved.alpha, float) and saved.decoding["cuda"] == {"measured": "no k here"}
    # An integer alpha and no decoding block are fine too.
    folder = tmp_path / "adapter"
    shutil.copytree(files / "adapter", folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["alpha"] = 8
    del cfg["decoding"]
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    again = MTPModel.from_pretrained(str(files / "model"), adapter=str(folder))
    assert again.config.alpha == 8.0 and isinstance(again.config.alpha, float) and again.default_k == 3
    for (name, a), (_, b) in zip(mtp.adapter_state_dict().items(), again.adapter_state_dict().items()):
        assert torch.equal(a, b), name
