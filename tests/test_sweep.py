"""Sweeps: the grid, the options each method takes, resuming, failed trials, results.json,
the command lines that reproduce trials, and real sweeps of the zoo's MLP in this process and
(slow) on a local Ray with two workers."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from compressor import runtime
from compressor.cli import main
from compressor.data import load_data
from compressor.errors import CompressionError, OptionError
from compressor.evaluate import evaluate
from compressor.models import zoo
from compressor.pipeline import CompressOptions, read_recipe
from compressor.profile import profile_model
from compressor.sweep import (
    SWEEP_OPTIONS,
    FileInput,
    InProcessExecutor,
    SweepSpec,
    Trial,
    make_executor,
    method_options,
    parse_values,
    results_schema_errors,
    run_sweep,
)

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "models" / "data" / "fashion_mnist_calib.npz"
EVAL = ROOT / "models" / "data" / "fashion_mnist_eval.npz"
MLP = zoo.get("mlp").checkpoint


def spec(tmp_path, **kw) -> SweepSpec:
    args = dict(model=MLP, arch="mlp", output=tmp_path / "sweep", methods=("svd",),
                ratios=(0.5,), data=str(CALIB), eval_data=str(EVAL), eval_limit=200,
                calib_samples=64, batch_sizes=(1,), latency_min_time_s=0.05)
    return SweepSpec(**{**args, **kw})


def _has_speedup_targets() -> bool:
    from compressor.methods import METHODS

    fields = {f.name for f in dataclasses.fields(CompressOptions)}
    return "speedup" in fields and any(
        getattr(m, "chooses_by_latency", False) for m in METHODS.values()
    )


# ----------------------------------------------------------------------------- the grid


def test_grid_applies_each_option_to_the_methods_that_take_it(tmp_path):
    s = spec(tmp_path, methods=("svd", "prune"), ratios=(0.75, 0.5),
             options=(("criterion", "l1,activation"), ("rank_multiple", "8,16")))
    assert [t.key for t in s.trials()] == [
        "svd-ratio0.75-rank_multiple=8",
        "svd-ratio0.75-rank_multiple=16",
        "svd-ratio0.5-rank_multiple=8",
        "svd-ratio0.5-rank_multiple=16",
        "prune-ratio0.75-criterion=l1",
        "prune-ratio0.75-criterion=activation",
        "prune-ratio0.5-criterion=l1",
        "prune-ratio0.5-criterion=activation",
    ]
    trial = s.trials()[5]
    assert trial == Trial("prune", 0.75, None, (("criterion", "activation"),))
    kwargs = s.compress_kwargs(trial)
    assert kwargs["method"] == "prune" and kwargs["ratio"] == 0.75
    assert kwargs["criterion"] == "activation" and "rank_multiple" not in kwargs
    assert kwargs["calib_samples"] == 64 and kwargs["arch"] == "mlp"


def test_a_chain_takes_the_options_of_its_methods(tmp_path):
    s = spec(tmp_path, methods=("prune+svd",), options=(("criterion", "l2"),
                                                         ("rank_multiple", "8")))
    (trial,) = s.trials()
    assert trial.key == "prune+svd-ratio0.5-criterion=l2-rank_multiple=8"
    assert s.compress_kwargs(trial)["method"] == "prune,svd"


def test_method_options_come_from_the_method_builders():
    svd, prune = method_options("svd"), method_options("prune")
    assert {"rank", "energy", "rank_multiple", "seed"} <= svd
    assert "criterion" not in svd and "channel_multiple" not in svd
    assert {"criterion", "ranking", "channel_multiple", "min_channels_fraction", "refit"} <= prune
    assert "rank" not in prune
    assert method_options("prune+svd") == svd | prune


def test_every_sweep_option_is_a_compress_option():
    fields = {f.name for f in dataclasses.fields(CompressOptions)}
    # quantize arrives with latency targets; the rest must exist today
    assert set(SWEEP_OPTIONS) - {"quantize"} <= fields


@pytest.mark.skipif(not _has_speedup_targets(), reason="the pipeline has no latency targets")
def test_speedup_targets_go_to_the_methods_that_choose_by_latency(tmp_path):
    s = spec(tmp_path, methods=("svd", "sketch"), ratios=(0.5,), speedups=(1.5, 2.0))
    assert [t.key for t in s.trials()] == [
        "svd-ratio0.5", "svd-speedup1.5x", "svd-speedup2x", "sketch-ratio0.5",
    ]
    assert s.notes() == ["--speedups: sketch choose by MACs only: swept by --ratios"]
    kwargs = s.compress_kwargs(s.trials()[1])
    assert kwargs["speedup"] == 1.5 and "ratio" not in kwargs and kwargs["batch"] == 1
    CompressOptions(model="m.pt", output="o.onnx", **kwargs)  # accepted as it is


def test_parse_values_types_values_as_the_compress_option():
    assert parse_values("rank", "8, 16") == (8, 16)
    assert parse_values("energy", "0.9,0.99") == (0.9, 0.99)
    assert parse_values("refit", "true,no") == (True, False)
    assert parse_values("rank", "none,8") == (None, 8)
    assert parse_values("criterion", ["l1"]) == ("l1",)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"options": (("rank", "8,x"),)}, "--rank: 'x' is not an integer"),
        ({"options": (("refit", "maybe"),)}, "--refit: 'maybe' is not true or false"),
        ({"options": (("rank", "8,8"),)}, "lists a value twice"),
        ({"options": (("provider", "cpu"),)}, "'provider' is not an option a sweep can vary"),
        ({"options": (("criterion", "l1"),)},
         "--criterion applies to none of the methods swept (svd); it is an option of prune"),
        ({"methods": ("svd", "nope")}, "unknown method 'nope'"),
        ({"methods": ("svd", "svd")}, "--methods lists a method twice"),
        ({"ratios": ()}, "give the targets to sweep: --ratios and/or --speedups"),
        ({"ratios": (0.5, 1.5)}, "--ratios: 1.5 is not in (0, 1]"),
        ({"speedups": (0.5,)}, "--speedups"),
    ],
)
def test_bad_grids_are_refused_by_message(tmp_path, kw, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec(tmp_path, **kw)


def test_command_line_reproduces_the_trial_options(tmp_path, monkeypatch):
    """The recorded command, run through the real CLI, builds the trial's CompressOptions."""
    s = spec(tmp_path, methods=("prune",), options=(
        ("criterion", "activation"), ("refit", "false"), ("ranking", "per-layer"),
        ("channel_multiple", "4"), ("seed", "3")))
    (trial,) = s.trials()
    captured = {}

    class Stop(Exception):
        pass

    def fake_compress(opts, progress=None):
        captured["opts"] = opts
        raise Stop

    import compressor.pipeline

    monkeypatch.setattr(compressor.pipeline, "compress", fake_compress)
    command = s.command(trial, tmp_path / "out.onnx")
    argv = shlex.split(command)
    assert argv[:2] == ["compressor", "compress"]
    result = CliRunner().invoke(main, argv[1:])
    assert isinstance(result.exception, Stop), result.output
    expected = CompressOptions(model=MLP, output=tmp_path / "out.onnx", data=str(CALIB),
                               **s.compress_kwargs(trial))

    def normal(opts):
        d = dataclasses.asdict(opts)
        return {k: str(v) if k in ("model", "output", "data") else v for k, v in d.items()}

    assert normal(captured["opts"]) == normal(expected)
    assert "--no-refit" in argv and "--per-layer" in argv and "--seed" in argv


# ----------------------------------------------------------------------------- resuming


class FakeTrials:
    """Both phases, counted; the trial whose key is in ``fail`` raises an OptionError."""

    def __init__(self, fail=()):
        self.compressed: list[str] = []
        self.timed: list[str] = []
        self.fail = set(fail)

    def compress(self, spec, trial, inputs):
        self.compressed.append(trial.key)
        if trial.key in self.fail:
            raise OptionError(f"--rank-multiple must be >= 1 ({trial.key})")
        ratio = trial.ratio
        record = {"status": "compressed", "quality": 0.8 + 0.1 * ratio,
                  "quality_metric": "accuracy", "accuracy": 0.8 + 0.1 * ratio,
                  "reference_accuracy": 0.9, "accuracy_delta": 0.1 * ratio - 0.1,
                  "agreement": 0.9 + 0.1 * ratio, "macs": int(1000 * ratio),
                  "params": int(1000 * ratio), "file_bytes": int(4000 * ratio),
                  "reference_macs": 1000, "reference_params": 1000,
                  "reference_file_bytes": 4000, "macs_ratio": ratio, "params_ratio": ratio,
                  "size_ratio": ratio}
        model = onnx.ModelProto.FromString(inputs.reference)
        model.graph.name = trial.key  # so that the timing phase can tell which it got
        return record, model.SerializeToString()

    def time(self, candidate, reference, inputs, batch_sizes, provider, threads, min_time_s):
        key = onnx.ModelProto.FromString(candidate).graph.name
        self.timed.append(key)
        return {"latency_ms": {"1": {"p50_ms": 1.0}}, "reference_latency_ms": {"1": {"p50_ms": 2.0}},
                "speedup": {"1": 2.0}}


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    """The MLP exported once: sweeps of fake trials load it without exporting it again."""
    from compressor import io

    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    io.save_model(io.load_model(MLP, arch="mlp").proto, path)
    return path


def _run(s, fake, **kw):
    return run_sweep(s, executor=InProcessExecutor(), compress_fn=fake.compress,
                     time_fn=fake.time, report=False, **kw)


def test_rerun_skips_finished_trials(tmp_path, mlp_onnx):
    s = spec(tmp_path, model=mlp_onnx, arch=None, ratios=(0.75, 0.5, 0.25))
    first = FakeTrials()
    results = _run(s, first)
    assert first.compressed == ["svd-ratio0.75", "svd-ratio0.5", "svd-ratio0.25"]
    assert len(first.timed) == 3 and results["counts"]["done"] == 3
    folder = tmp_path / "sweep"
    for key in first.compressed:  # each trial was written as its own file
        assert json.loads((folder / "trials" / f"{key}.json").read_text())["status"] == "done"
        assert (folder / "models" / f"{key}.onnx").is_file()

    again = FakeTrials()
    results = _run(s, again)
    assert again.compressed == [] and again.timed == []
    assert [t["key"] for t in results["trials"]] == first.compressed

    # one trial lost its record; one was compressed but not yet timed; a new ratio appears
    (folder / "trials" / "svd-ratio0.5.json").unlink()
    record = json.loads((folder / "trials" / "svd-ratio0.25.json").read_text())
    record["status"] = "compressed"
    (folder / "trials" / "svd-ratio0.25.json").write_text(json.dumps(record))
    third = FakeTrials()
    grown = spec(tmp_path, model=mlp_onnx, arch=None, ratios=(0.75, 0.5, 0.25, 0.1))
    results = _run(grown, third)
    assert third.compressed == ["svd-ratio0.5", "svd-ratio0.1"]
    assert sorted(third.timed) == ["svd-ratio0.1", "svd-ratio0.25", "svd-ratio0.5"]
    assert results["counts"] == {"trials": 4, "done": 4, "failed": 0, "compressed": 0}


def test_failed_trial_is_recorded_and_the_others_finish(tmp_path, mlp_onnx):
    s = spec(tmp_path, model=mlp_onnx, arch=None, ratios=(0.75, 0.5, 0.25))
    fake = FakeTrials(fail={"svd-ratio0.5"})
    results = _run(s, fake)
    by_key = {t["key"]: t for t in results["trials"]}
    failed = by_key["svd-ratio0.5"]
    assert failed["status"] == "failed" and failed["failed_phase"] == "compress"
    assert failed["error"] == "--rank-multiple must be >= 1 (svd-ratio0.5)"
    assert failed["error_type"] == "OptionError" and "traceback" not in failed
    assert failed["command"].startswith("compressor compress ")
    assert by_key["svd-ratio0.75"]["status"] == by_key["svd-ratio0.25"]["status"] == "done"
    assert results_schema_errors(results) == []

    # a rerun keeps the failure; --retry-failed runs it again
    again = FakeTrials()
    _run(s, again)
    assert again.compressed == []
    retry = FakeTrials()
    results = _run(s, retry, retry_failed=True)
    assert retry.compressed == ["svd-ratio0.5"]
    assert results["counts"]["failed"] == 0


class RecordingExecutor(InProcessExecutor):
    """Two slots; runs each task when it is waited for, oldest first, and records what was
    running when each task was submitted."""

    slots = 2

    def __init__(self):
        self.pending: list = []
        self.submitted: list[tuple[str, bool, int]] = []  # (fn, timing, others running)

    def submit(self, fn, args, timing=False):
        handle = (fn, args)
        name = args[1].key if fn.__name__ == "compress" else fn.__name__
        self.submitted.append((name, timing, len(self.pending)))
        self.pending.append(handle)
        return handle

    def wait(self, handles):
        handle = self.pending.pop(0)
        assert handle in handles
        fn, args = handle
        return handle, fn(*args), None


@pytest.mark.skipif(not _has_speedup_targets(), reason="the pipeline has no latency targets")
def test_compressions_that_time_candidates_run_alone(tmp_path, mlp_onnx):
    s = spec(tmp_path, model=mlp_onnx, arch=None, ratios=(0.75, 0.5, 0.25),
             speedups=(1.5, 2.0))
    executor, fake = RecordingExecutor(), FakeTrials()

    def compress_any(spec, trial, inputs):  # the fake reads trial.ratio: speedup trials too
        return fake.compress(spec, dataclasses.replace(trial, ratio=trial.ratio or 0.4), inputs)

    compress_any.__name__ = "compress"
    run_sweep(s, executor=executor, compress_fn=compress_any, time_fn=fake.time, report=False)
    compressions = [(k, timing, others) for k, timing, others in executor.submitted
                    if k != "time"]
    # ratio trials two at a time, without holding the cores
    assert compressions[:3] == [("svd-ratio0.75", False, 0), ("svd-ratio0.5", False, 1),
                                ("svd-ratio0.25", False, 1)]
    # speedup trials alone, holding the cores; then the timings, alone too
    assert compressions[3:] == [("svd-speedup1.5x", True, 0), ("svd-speedup2x", True, 0)]
    timings = [(timing, others) for k, timing, others in executor.submitted if k == "time"]
    assert timings == [(True, 0)] * 5


def test_a_bug_in_a_trial_keeps_its_traceback(tmp_path, mlp_onnx):
    def broken(spec, trial, inputs):
        raise ZeroDivisionError("division by zero")

    results = run_sweep(spec(tmp_path, model=mlp_onnx, arch=None),
                        executor=InProcessExecutor(), compress_fn=broken, report=False)
    (trial,) = results["trials"]
    assert trial["error_type"] == "ZeroDivisionError"
    assert "raise ZeroDivisionError" in trial["traceback"]


def test_a_folder_of_another_sweep_is_refused(tmp_path, mlp_onnx):
    _run(spec(tmp_path, model=mlp_onnx, arch=None), FakeTrials())
    with pytest.raises(OptionError, match=r"holds a sweep of other inputs \(differs in: "
                                          r"calib_samples, eval_limit\)"):
        _run(spec(tmp_path, model=mlp_onnx, arch=None, calib_samples=32, eval_limit=100),
             FakeTrials())


def test_missing_ray_is_one_line_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(CompressionError, match=r"pip install 'compressor\[sweep\]'"):
        make_executor(workers=2)
    result = CliRunner().invoke(main, ["sweep", str(MLP), "--arch", "mlp", "--methods", "svd",
                                       "--ratios", "0.5", "-o", str(tmp_path / "s"),
                                       "--workers", "2"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: sweeps with more than one worker run on Ray, which is not installed: "
        "pip install 'compressor[sweep]'"
    ]
    assert not (tmp_path / "s").exists()


def test_files_shipped_to_a_cluster_are_written_once_under_their_own_name(tmp_path):
    content = CALIB.read_bytes()
    shipped = FileInput(str(CALIB), content)
    path = Path(shipped.local_path())
    assert path.name == CALIB.name and path.read_bytes() == content and path != CALIB
    assert shipped.local_path() == str(path)
    other = Path(FileInput(str(CALIB), content + b"x").local_path())
    assert other != path and other.read_bytes() == content + b"x"
    assert FileInput(str(CALIB)).local_path() == str(CALIB)  # not shipped: used where it is


def test_results_schema_catches_what_is_missing():
    assert results_schema_errors({}) == ["'trials' is not a list"]
    errors = results_schema_errors({"trials": [{"key": "a", "method": "svd", "options": {},
                                                "status": "done", "ratio": 0.5}]})
    assert "trials[0].quality is not a number" in errors
    assert "trials[0].speedup is not a dict by batch size" in errors


# ----------------------------------------------------------------------------- real sweeps


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """One real in-process sweep through the CLI: svd at ratio 0.5 with rank multiples 0 (the
    method rejects it) and 16."""
    folder = tmp_path_factory.mktemp("real") / "sweep"
    args = ["sweep", str(MLP), "--arch", "mlp", "--methods", "svd", "--ratios", "0.5",
            "--rank-multiple", "0,16", "--data", str(CALIB), "--calib-samples", "64",
            "--eval-data", str(EVAL), "--eval-limit", "500", "--latency-time", "0.05",
            "-o", str(folder), "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folder, json.loads(result.output)


def test_real_sweep_writes_results_json(real_sweep):
    folder, printed = real_sweep
    results = json.loads((folder / "results.json").read_text())
    assert results == printed
    assert results_schema_errors(results) == []
    assert [t["key"] for t in results["trials"]] == ["svd-ratio0.5-rank_multiple=0",
                                                      "svd-ratio0.5-rank_multiple=16"]
    for name in ("pareto.png", "accuracy_vs_ratio.png", "runtime_vs_ratio.png", "report.html"):
        assert (folder / name).stat().st_size > 1000
    assert results["timing"].startswith("Latency was timed one trial at a time")
    assert results["run"]["executor"] == "in-process"


def test_real_sweep_records_the_rejected_option(real_sweep):
    _, results = real_sweep
    failed, done = results["trials"]
    assert failed["status"] == "failed"
    assert failed["error"] == "rank multiple must be >= 1, got 0"
    assert done["status"] == "done"
    assert results["counts"] == {"trials": 2, "done": 1, "failed": 1, "compressed": 0}


def test_real_trial_matches_evaluate_and_its_command_reproduces_it(real_sweep, tmp_path):
    folder, results = real_sweep
    trial = results["trials"][1]
    model = Path(trial["model"])
    data = load_data(EVAL, limit=500, input_shape=(1, 28, 28))
    reference = onnx.load(folder / "original.onnx")
    report = evaluate(model, reference=reference, data=data, batch_sizes=(), progress=False)
    assert trial["accuracy"] == report.candidate.accuracy
    assert trial["agreement"] == report.comparison.agreement
    assert trial["reference_accuracy"] == results["original"]["accuracy"]
    assert trial["macs"] == profile_model(onnx.load(model)).macs
    assert trial["macs_ratio"] == pytest.approx(0.5, abs=0.02)
    assert set(trial["speedup"]) == {"1", "64"}
    assert trial["speedup"]["64"] == pytest.approx(
        trial["reference_latency_ms"]["64"]["p50_ms"] / trial["latency_ms"]["64"]["p50_ms"])

    # the recorded command, run again, makes a model with the same outputs
    argv = shlex.split(trial["command"])
    out = tmp_path / "again.onnx"
    argv[argv.index("-o") + 1] = str(out)
    result = CliRunner().invoke(main, [*argv[1:], "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    x = data.x[:64]
    outputs = []
    for path in (model, out):
        session = runtime.session(onnx.load(path))
        outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.slow
def test_two_trials_on_ray_with_two_workers(real_sweep, tmp_path):
    pytest.importorskip("ray")
    folder = tmp_path / "ray"
    result = CliRunner().invoke(main, [
        "sweep", str(MLP), "--arch", "mlp", "--methods", "svd", "--ratios", "0.75,0.5",
        "--data", str(CALIB), "--calib-samples", "64", "--eval-data", str(EVAL),
        "--eval-limit", "500", "--latency-time", "0.05", "-o", str(folder), "--workers", "2",
        "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads(result.output)
    assert results["run"]["executor"] == "ray" and results["run"]["workers"] == 2
    assert results["counts"]["done"] == 2 and results_schema_errors(results) == []
    # the same trial in this process and on Ray: the same model, the same measurements
    in_process = real_sweep[1]["trials"][1]
    on_ray = next(t for t in results["trials"] if t["key"] == "svd-ratio0.5")
    for name in ("macs", "params", "accuracy", "agreement"):
        assert on_ray[name] == in_process[name], name
    # Ray's workers run numpy with one thread (OMP_NUM_THREADS=1): float sums in another
    # order, so logits differ in the last digits, and the recipe's verification figures by a
    # few characters of the file
    assert on_ray["max_abs_logit_diff"] == pytest.approx(in_process["max_abs_logit_diff"],
                                                         rel=1e-4)
    assert on_ray["file_bytes"] == pytest.approx(in_process["file_bytes"], abs=64)


@pytest.mark.slow
def test_a_running_ray_is_used_and_files_travel_with_the_tasks(real_sweep, tmp_path):
    """With --ray-address, a Ray the process already joined is used as it is (not shut down),
    and the model and data files go to the workers through the object store."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        s = spec(tmp_path, eval_limit=500, batch_sizes=(1, 64), ratios=(0.5,),
                 options=(("rank_multiple", "16"),))
        results = run_sweep(s, ray_address="auto", report=False)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    (trial,) = results["trials"]
    assert trial["status"] == "done", trial.get("error")
    assert results["run"]["ray_address"] == "auto"
    # the recipe names the worker's copy of the data: a file of the same name elsewhere
    recipe = read_recipe(onnx.load(trial["model"]))
    assert Path(recipe["options"]["data"]).name == CALIB.name
    assert Path(recipe["options"]["data"]) != CALIB
    in_process = real_sweep[1]["trials"][1]
    assert trial["key"] == in_process["key"]
    for name in ("macs", "params", "accuracy", "agreement"):
        assert trial[name] == in_process[name], name
