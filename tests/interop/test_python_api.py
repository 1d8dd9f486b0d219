"""The Python module (`pip install .`): a transfer from Python that PEFT loads and that equals the
command line's, bit for bit; the command line's defaults and error messages, raised as
exceptions; progress on the calling thread, a raising callback that stops the job with nothing
written; the GIL released while the engine runs."""

import errno
import _thread
import inspect as pyinspect
import json
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import interop_util as iu

loraxfer = pytest.importorskip("loraxfer", reason="the module is installed by tests/interop/run.sh")

ARCH = "qwen2"
FAST = dict(rank=8, oversample=4)  # the zoo's models are tiny; keep every call quick


def cli_error(binary, *args) -> str:
    """What the command line prints after `error: ` when it fails."""
    proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout
    line = next(l for l in proc.stderr.splitlines() if l.startswith("error: "))
    return line[len("error: "):]


def test_transfer_from_python_loads_in_peft_and_equals_the_cli(zoo, tmp_path):
    adapter, source, target = zoo.adapter(ARCH), zoo.base(ARCH), zoo.derived(ARCH)
    steps = []
    report = loraxfer.transfer(source, target, adapter, tmp_path / "py", mode="rotate",
                               progress=lambda *s: steps.append(s), **FAST)
    cli = zoo.transfer(adapter, source, target, "--mode", "rotate", "--rank", "8",
                       "--oversample", "4")

    # The report is the file the command line writes, as a dict.
    on_disk = json.loads((tmp_path / "py" / "transfer_report.json").read_text())
    assert report == on_disk
    assert report["mode"] == "rotate" and report["rank"] == 8
    assert report["summary"]["transferred"] == len(report["modules"]) > 0

    # Progress: step 0, then one per module, in order, on this thread.
    total = len(report["modules"])
    assert steps == [("transfer", i, total) for i in range(total + 1)]

    # The same adapter as the command line's, every tensor bit for bit, and the same config.
    got = iu.read_tensors(tmp_path / "py" / "adapter_model.safetensors")
    want = iu.read_tensors(cli / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert json.loads((tmp_path / "py" / "adapter_config.json").read_text()) == \
        json.loads((cli / "adapter_config.json").read_text())

    # PEFT loads it onto the target with every tensor in place.
    peft_model = iu.load_peft_strict(iu.load_model(target), tmp_path / "py")
    assert np.isfinite(iu.logits(peft_model)).all()


def test_signature_has_the_command_lines_options_and_defaults():
    for name, func, cli_only in [("transfer", loraxfer.transfer, {"timings"}),
                                 ("inspect", loraxfer.inspect, {"json"})]:
        specs = {o["name"]: o for o in loraxfer.options(name)}
        params = pyinspect.signature(func).parameters
        assert set(params) - {"progress"} == set(specs) - cli_only, name
        for opt, spec in specs.items():
            if opt in cli_only:
                continue
            default = params[opt].default
            if spec["required"]:
                assert default is pyinspect.Parameter.empty, opt
            elif spec["switch"]:
                assert default is False, opt
            elif spec["default"] is None:
                assert default is None, opt
            elif isinstance(default, (int, float)):
                assert default == type(default)(spec["default"]), (opt, default, spec["default"])
            else:
                assert default == spec["default"], (opt, default, spec["default"])
                if spec["choices"]:
                    assert default in spec["choices"], opt


def test_errors_are_exceptions_with_the_cli_messages(zoo, binary, tmp_path):
    adapter, source, target = zoo.adapter(ARCH), zoo.base(ARCH), zoo.derived(ARCH)

    # A missing model: the message names the path and where it looked.
    missing = tmp_path / "no-such-model"
    with pytest.raises(loraxfer.LoraxferError) as err:
        loraxfer.transfer(missing, target, adapter, tmp_path / "a")
    assert str(err.value) == cli_error(binary, "transfer", "--source-base", missing,
                                       "--target-base", target, "--adapter", adapter,
                                       "--out", tmp_path / "a")
    assert str(missing) in str(err.value)
    assert not (tmp_path / "a").exists()

    # An existing output without force: FileExistsError too; force=True replaces it.
    (tmp_path / "b").mkdir()
    with pytest.raises(loraxfer.OutputExistsError) as err:
        loraxfer.transfer(source, target, adapter, tmp_path / "b", **FAST)
    assert isinstance(err.value, FileExistsError) and err.value.kind == "output_exists"
    assert (err.value.errno, err.value.filename) == (errno.EEXIST, str(tmp_path / "b"))
    assert str(err.value) == cli_error(binary, "transfer", "--source-base", source,
                                       "--target-base", target, "--adapter", adapter,
                                       "--out", tmp_path / "b")
    loraxfer.transfer(source, target, adapter, tmp_path / "b", force=True, **FAST)
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()

    # A file the system will not read: an OSError with its errno and path, the CLI's message.
    unreadable = tmp_path / "unreadable"
    (unreadable / "config.json").mkdir(parents=True)
    with pytest.raises(loraxfer.InputError) as err:
        loraxfer.transfer(unreadable, target, adapter, tmp_path / "e")
    assert isinstance(err.value, OSError) and err.value.kind == "io"
    assert err.value.errno == errno.EISDIR
    assert err.value.filename == str(unreadable / "config.json")
    assert str(err.value) == cli_error(binary, "transfer", "--source-base", unreadable,
                                       "--target-base", target, "--adapter", adapter,
                                       "--out", tmp_path / "e")

    # A value the command line refuses: ValueError with clap's message.
    with pytest.raises(loraxfer.InvalidArgumentError) as err:
        loraxfer.transfer(source, target, adapter, tmp_path / "c", mode="sideways")
    assert isinstance(err.value, ValueError)
    assert "invalid value 'sideways' for '--mode <MODE>'" in str(err.value)
    assert "possible values: auto, copy" in str(err.value)
    assert cli_error(binary, "transfer", "--source-base", source, "--target-base", target,
                     "--adapter", adapter, "--out", tmp_path / "c", "--mode", "sideways") \
        in str(err.value)

    # A value the engine refuses after parsing (rank 0).
    with pytest.raises(loraxfer.InvalidArgumentError) as err:
        loraxfer.transfer(source, target, adapter, tmp_path / "d", rank=0)
    assert str(err.value) == cli_error(binary, "transfer", "--source-base", source,
                                       "--target-base", target, "--adapter", adapter,
                                       "--out", tmp_path / "d", "--rank", "0")

    # An unknown keyword is Python's own TypeError.
    with pytest.raises(TypeError):
        loraxfer.transfer(source, target, adapter, tmp_path / "e", sideways=True)
    assert not any((tmp_path / n).exists() for n in "cde")


def test_arguments_are_checked_as_python_types(binary, tmp_path, monkeypatch):
    q, a = tmp_path / "q", tmp_path / "a"
    iu.loraxfer(binary, "synth", "model", "--like", "tiny-qwen2", "--seed", "1", "--out", q)
    iu.loraxfer(binary, "synth", "adapter", "--base", q, "--out", a)
    out = tmp_path / "never"
    for kwargs, error in [({"rank": False}, TypeError), ({"rank": None}, TypeError),
                          ({"mode": None}, TypeError), ({"force": "yes"}, TypeError),
                          ({"modules": []}, ValueError)]:
        with pytest.raises(error):
            loraxfer.transfer(q, q, a, out, **kwargs)
    with pytest.raises(TypeError):
        loraxfer.transfer(5, q, a, out)
    assert not out.exists()
    # modules: any iterable of names; `~` expanded as a shell would.
    monkeypatch.setenv("HOME", str(tmp_path))
    report = loraxfer.transfer(q, q, a, "~/mine", modules={"q_proj"}, rank=8)
    assert (tmp_path / "mine" / "adapter_model.safetensors").is_file()
    assert report["selected_modules"] == ["q_proj"]
    assert {r["module"] for r in report["modules"] if r["transferred"]} == {"q_proj"}


def test_modules_that_come_out_zero_are_warned_about(binary, tmp_path):
    # Map mode onto a target whose layer 1 has all-zero weights: its modules have nowhere to go.
    from safetensors.numpy import load_file, save_file
    q, t, a = tmp_path / "q", tmp_path / "t", tmp_path / "a"
    iu.loraxfer(binary, "synth", "model", "--like", "tiny-qwen2", "--seed", "1", "--out", q)
    iu.loraxfer(binary, "synth", "model", "--like", "tiny-llama", "--seed", "2", "--dtype", "f32",
                "--out", t)
    iu.loraxfer(binary, "synth", "adapter", "--base", q, "--out", a)
    weights = load_file(t / "model.safetensors")
    for name in weights:
        if name.startswith("model.layers.1.") and name.endswith("_proj.weight"):
            weights[name] = np.zeros_like(weights[name])
    save_file(weights, t / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="came out zero"):
        report = loraxfer.transfer(q, t, a, tmp_path / "out", mode="map", rank=8)
    assert report["summary"]["emptied"] >= 7


def test_a_raising_callback_stops_the_job_and_writes_nothing(zoo, tmp_path):
    adapter, source, target = zoo.adapter(ARCH), zoo.base(ARCH), zoo.derived(ARCH)
    seen = []

    class Stop(Exception):
        pass

    def callback(stage, done, total):
        seen.append(done)
        if done == 2:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        loraxfer.transfer(source, target, adapter, tmp_path / "out", progress=callback, **FAST)
    assert seen[-1] == 2, seen  # not called again once it raised
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


@pytest.fixture(scope="module")
def wide_pair(binary, tmp_path_factory):
    """A 2-layer Qwen2 of hidden 512 and MLP 2048, its 5%-drifted derivative and an adapter:
    wide enough that a rank-256 transfer computes for a second or so."""
    import transformers as tf

    root = tmp_path_factory.mktemp("wide")
    config = tf.Qwen2Config(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=64, num_hidden_layers=2,
                            vocab_size=256, tie_word_embeddings=False)
    source = iu.save_model(tf.Qwen2ForCausalLM(config), root / "source")
    iu.loraxfer(binary, "synth", "model", "--derive-from", source, "--drift", "0.05",
                "--out", root / "target")
    iu.loraxfer(binary, "synth", "adapter", "--base", source, "--out", root / "adapter")
    return source, root / "target", root / "adapter"


def test_the_gil_is_released_while_the_engine_runs(wide_pair, tmp_path):
    """A Python thread that wakes every millisecond keeps running while a transfer computes. Were
    the GIL held, it would run only in the instants the progress callback runs."""
    source, target, adapter = wide_pair
    stamps, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            stamps.append(time.monotonic())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    spans = []
    try:
        # Transfers until the engine has run long enough to tell (one on a slow machine, more on
        # a fast one), rather than a bound on how long one takes.
        while sum(b - a for a, b in spans) < 0.3 and len(spans) < 50:
            start = time.monotonic()
            loraxfer.transfer(source, target, adapter, tmp_path / f"out{len(spans)}",
                              power_iters=4)
            spans.append((start, time.monotonic()))
    finally:
        stop.set()
        thread.join()
    total = sum(b - a for a, b in spans)
    assert total >= 0.3, f"50 transfers took {total:.3f} s: too short to tell"
    covered = 0.0
    for start, end in spans:
        inside = [t for t in stamps if start <= t <= end]
        # The time covered by gaps of at most 20 ms (a scheduler's slice on a busy machine).
        covered += sum(b - a for a, b in zip(inside, inside[1:]) if b - a <= 0.02)
    assert covered > 0.5 * total, (covered, total)


def test_ctrl_c_stops_the_job_and_writes_nothing(wide_pair, tmp_path):
    """SIGINT during a transfer (as a notebook's interrupt sends it) raises KeyboardInterrupt
    within the 100 ms the waiting thread polls, leaving no output and no staging directory. The
    interrupt comes from another thread 10 ms after the first module is done, so that it lands
    mid-job however fast or slow the machine (a fixed delay from the call's start lost the race
    on a busy machine). Python's own SIGINT handler is installed for the test: started from a
    background job of a non-interactive shell, the process inherits SIGINT ignored, Python then
    installs no handler, and an interrupt does nothing."""
    source, target, adapter = wide_pair
    sent, seen = [], []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt():
        sent.append(time.monotonic())
        _thread.interrupt_main()

    timer = threading.Timer(0.01, interrupt)

    def progress(stage, done, total):
        seen.append((stage, done, total))
        if done == 1:
            timer.start()

    try:
        with pytest.raises(KeyboardInterrupt):
            loraxfer.transfer(source, target, adapter, tmp_path / "out", power_iters=4,
                              progress=progress)
            pytest.fail(f"the transfer ran to its end: interrupt sent at {sent}, steps {seen}")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    # The engine stops at the next unit, before the job's end (how soon is the poll's 100 ms and
    # the units in flight: not asserted, the machine's speed would decide it).
    assert sent, seen
    assert seen[-1][1] < seen[-1][2], seen
    assert list(tmp_path.iterdir()) == []


def test_inspect_equals_the_cli(zoo, binary):
    source, target = zoo.base(ARCH), zoo.derived(ARCH)
    got = loraxfer.inspect(source, target, rank=8, oversample=4)
    proc = iu.loraxfer(binary, "inspect", "--source-base", source, "--target-base", target,
                       "--rank", "8", "--oversample", "4", "--json")
    want = json.loads(proc.stdout)
    got.pop("total_ms"), want.pop("total_ms")
    assert got == want
    assert len(got["pairs"]) == 7 * iu.LAYERS[ARCH]


def test_map_mode_reports_its_map_stages_and_stops_in_them(binary, tmp_path):
    """Across depths (tiny Qwen2, 4 layers → tiny Llama, 6) the map mode first fits the residual
    map on the shared tokens (stage `residual`: its anchor sets, then the polar factor), compares
    the layers of both models (stage `depth`), then builds each target layer's map (stage `map`)
    and runs that layer's modules (`transfer`) before the next; a callback that raises inside the
    map stage stops the job there, before the next layer's modules, with nothing written."""
    for like, out in [("tiny-qwen2", "source"), ("tiny-llama", "target")]:
        iu.loraxfer(binary, "synth", "model", "--like", like, "--out", tmp_path / out)
    iu.loraxfer(binary, "synth", "adapter", "--base", tmp_path / "source", "--out",
                tmp_path / "adapter")
    args = (tmp_path / "source", tmp_path / "target", tmp_path / "adapter")
    seen = []
    loraxfer.transfer(*args, tmp_path / "out", mode="map", progress=lambda *s: seen.append(s),
                      **FAST)
    stages = [s[0] for s in seen]
    first_mapped = stages.index("map")
    assert stages[:first_mapped] == sorted(stages[:first_mapped], key=["residual", "depth"].index)
    assert set(stages[first_mapped:]) == {"map", "transfer"}, stages
    # A layer's 7 modules run after its map is built and before the next layer's.
    for layer in range(1, 7):
        built = seen.index(("map", layer, 6))
        assert seen[built + 1:built + 8] == [("transfer", 7 * (layer - 1) + i, 42)
                                             for i in range(1, 8)], seen
    residual = [s for s in seen if s[0] == "residual"]
    assert residual[0][2] in (2, 3)
    assert residual == [("residual", i, residual[0][2]) for i in range(residual[0][2] + 1)]
    assert [s for s in seen if s[0] == "depth"] == [("depth", i, 10) for i in range(11)]
    assert [s for s in seen if s[0] == "map"] == [("map", i, 6) for i in range(7)]
    assert [s for s in seen if s[0] == "transfer"] == [("transfer", i, 42) for i in range(43)]

    class Stop(Exception):
        pass

    def stop_in_map(stage, done, total):
        if stage == "map" and done == 2:
            raise Stop

    with pytest.raises(Stop):
        loraxfer.transfer(*args, tmp_path / "stopped", mode="map", progress=stop_in_map, **FAST)
    assert not any(p.name.startswith((".stopped", "stopped")) for p in tmp_path.iterdir())


def test_export_mlx_from_python_equals_the_cli(zoo, binary, tmp_path):
    adapter = zoo.adapter("qwen2")
    done = loraxfer.export_mlx(adapter, tmp_path / "py")
    assert done["modules"] == 7 * iu.LAYERS["qwen2"] and done["path"] == str(tmp_path / "py")
    assert done["keys"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                            "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    iu.loraxfer(binary, "export-mlx", "--adapter", adapter, "--out", tmp_path / "cli")
    for name in ("adapters.safetensors", "adapter_config.json"):
        assert (tmp_path / "py" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    with pytest.raises(loraxfer.OutputExistsError):
        loraxfer.export_mlx(adapter, tmp_path / "py")
    with pytest.raises(TypeError, match="force must be"):
        loraxfer.export_mlx(adapter, tmp_path / "x", force=1)
    loraxfer.export_mlx(adapter, tmp_path / "py", force=True)
    assert done["num_layers"] == -1
    based = loraxfer.export_mlx(adapter, tmp_path / "based", base=zoo.base("qwen2"))
    assert based["num_layers"] == iu.LAYERS["qwen2"]
    with pytest.raises(TypeError, match="base must be"):
        loraxfer.export_mlx(adapter, tmp_path / "y", base=3)


def test_export_gguf_from_python_equals_the_cli(zoo, binary, tmp_path):
    adapter, base = zoo.adapter("qwen2"), zoo.base("qwen2")
    done = loraxfer.export_gguf(adapter, base, tmp_path / "py.gguf")
    assert done["architecture"] == "qwen2" and done["modules"] == 7 * iu.LAYERS["qwen2"]
    assert done["path"] == str(tmp_path / "py.gguf")
    iu.loraxfer(binary, "export-gguf", "--adapter", adapter, "--base", base, "--out", tmp_path / "cli.gguf")
    assert (tmp_path / "py.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()
    with pytest.raises(loraxfer.OutputExistsError):
        loraxfer.export_gguf(adapter, base, tmp_path / "py.gguf")
    with pytest.raises(TypeError):
        loraxfer.export_gguf(adapter, base, tmp_path / "x.gguf", force="yes")
    with pytest.raises(TypeError, match="out must be"):
        loraxfer.export_gguf(adapter, base, 42)
    # force=True replaces an earlier LoRA GGUF, never another file.
    (tmp_path / "py.gguf").write_bytes(b"x")
    with pytest.raises(loraxfer.InvalidArgumentError, match="not an earlier output"):
        loraxfer.export_gguf(adapter, base, tmp_path / "py.gguf", force=True)
    assert (tmp_path / "py.gguf").read_bytes() == b"x"
    (tmp_path / "py.gguf").unlink()
    loraxfer.export_gguf(adapter, base, tmp_path / "py.gguf")
    loraxfer.export_gguf(adapter, base, tmp_path / "py.gguf", force=True)
    assert (tmp_path / "py.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()

