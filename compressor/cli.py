"""The command line: a thin click layer over compressor.pipeline, evaluate and profile.

A ``CompressionError`` (a problem with the user's files or options) becomes one line on stderr
and a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from compressor import __version__
from compressor.errors import CompressionError, OptionError


def _console(stderr: bool = False) -> Console:
    # Piped output gets rich's 80 columns, too narrow for the per-layer tables: use 140.
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=140)


stdout = _console()
stderr = _console(stderr=True)


def _friendly_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompressionError as e:
            # escaped: messages hold brackets that are not markup ("compressor[sweep]")
            stderr.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True,
                soft_wrap=True,
            )
            sys.exit(e.exit_code)

    return wrapper


def _input_shape(ctx, param, value):
    if not value:
        return None
    from compressor.io import parse_input_shapes

    try:
        return parse_input_shapes(value)
    except OptionError as e:
        raise click.BadParameter(str(e)) from e


def _method_names() -> list[str]:
    from compressor.methods import METHODS

    return list(METHODS)


model_loading = [
    click.option(
        "--arch",
        help="Model-zoo architecture of a state-dict checkpoint (see `compressor inspect --zoo`).",
    ),
    click.option(
        "--input-shape",
        multiple=True,
        callback=_input_shape,
        help="Per-sample input shape (no batch) where the file records none or leaves a "
        "dimension symbolic: 1,28,28 for a single-input model; NAME:DIMS for each input of a "
        "model with several, the option repeated (--input-shape input_ids:128 "
        "--input-shape attention_mask:128).",
    ),
    click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow loading a pickled nn.Module (a pickle can run code: only for files you trust).",
    ),
]


def _apply(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compressor")
def main():
    """Compress trained models into smaller, faster ONNX graphs for onnxruntime."""


@main.command("compress")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--method",
    "-m",
    required=True,
    help="Compression method, or a comma list applied in order toward one target (prune,svd): "
    + ", ".join(_method_names())
    + ".",
)
@click.option(
    "--ratio",
    type=float,
    help="Fraction of the model's MACs to keep, in (0, 1] (default 0.5; no MACs cap when "
    "--speedup is given).",
)
@click.option(
    "--speedup",
    type=float,
    help="Target: the result runs at least this many times faster than the original (> 1), "
    "measured by onnxruntime on this machine with --provider, --threads and --batch.",
)
@click.option(
    "--batch",
    type=int,
    default=1,
    show_default=True,
    help="Batch size that --speedup is measured and chosen at.",
)
@click.option("--threads", type=int, help="onnxruntime intra-op threads for timing (default: all).")
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="Last stage: onnxruntime's static int8 quantization (QDQ, per-channel weights, "
    "calibrated on --data); nodes measured slower in int8 or too inexact stay fp32.",
)
@click.option(
    "--data",
    help="Calibration data: .npz (x, optional y), an image folder, or a "
    "dataset name (fashion-mnist, digits). Without it, methods run data-free.",
)
@click.option(
    "--calib-samples",
    type=int,
    default=512,
    show_default=True,
    help="Number of calibration samples taken from --data.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Output .onnx file (written atomically; never the input).",
)
@_apply(model_loading)
@click.option("--rank", type=int, help="svd: one rank for every layer (instead of --ratio).")
@click.option(
    "--energy",
    type=float,
    help="svd: keep this fraction of each layer's output energy (instead of --ratio).",
)
@click.option(
    "--scheme",
    "schemes",
    multiple=True,
    type=click.Choice(["channel", "spatial"]),
    help="svd: factorisation schemes to consider (default: both).",
)
@click.option(
    "--rank-multiple",
    type=int,
    default=16,
    show_default=True,
    help="svd: ranks are multiples of this (onnxruntime's blocked convs want 16 on AVX-512, "
    "8 on AVX2).",
)
@click.option(
    "--sketches",
    type=int,
    default=2,
    show_default=True,
    help="sketch: number of sketches averaged.",
)
@click.option("--sketch-rows", type=int, help="sketch: rows per sketch for every layer.")
@click.option(
    "--no-refit",
    is_flag=True,
    help="sketch: keep the averaged sign matrices even with calibration data; prune, lsh: "
    "correct only the next layers' biases instead of refitting them.",
)
@click.option(
    "--threshold", type=float, help="diffconv: skip input differences with |d| <= threshold."
)
@click.option(
    "--tolerance", type=float, default=1e-4, show_default=True,
    help="fast-conv: the largest relative output error (fp32) an algorithm may have on a layer.",
)
@click.option(
    "--criterion",
    default="l1",
    show_default=True,
    help="prune: channel importance: l1, l2, activation (needs --data), lsh (redundancy) or "
    "reconstruction (next layers' least-squares error; needs --data).",
)
@click.option(
    "--global-ranking/--per-layer",
    "global_ranking",
    default=True,
    show_default=True,
    help="prune: rank channels across the whole model, or keep the same fraction per layer.",
)
@click.option(
    "--min-channels-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="prune, lsh: no layer keeps fewer than this fraction of its channels.",
)
@click.option(
    "--channel-multiple",
    type=int,
    default=8,
    show_default=True,
    help="prune: kept channel counts are multiples of this where a layer allows (onnxruntime's "
    "blocked convs: other counts run slower per MAC; 16 is fastest on AVX-512, 1 is finest).",
)
@click.option("--lsh-bits", type=int,
              help="lsh, lsh-conv, lsh-window: SimHash bits per table (default: chosen by --ratio).")
@click.option("--lsh-tables", type=int,
              help="lsh, lsh-conv: SimHash tables (default: chosen by --ratio).")
@click.option(
    "--asymmetric",
    is_flag=True,
    help="lsh: asymmetric (Sign-ALSH, maximum inner product) hashing of the filters.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="onnxruntime provider for calibration and checks.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or tables.")
@click.option("-v", "--verbose", is_flag=True, help="Also print the seconds each stage took.")
@_friendly_errors
def compress_command(
    model,
    method,
    ratio,
    data,
    calib_samples,
    output,
    arch,
    input_shape,
    trust_pickle,
    rank,
    energy,
    schemes,
    rank_multiple,
    sketches,
    sketch_rows,
    no_refit,
    threshold,
    tolerance,
    criterion,
    global_ranking,
    min_channels_fraction,
    channel_multiple,
    lsh_bits,
    lsh_tables,
    asymmetric,
    seed,
    provider,
    as_json,
    quiet,
    speedup,
    batch,
    threads,
    quantize,
    verbose,
):
    """Compress MODEL (.onnx, TorchScript .pt, torch.export .pt2, or a state dict with --arch)."""
    from compressor import report
    from compressor.pipeline import CompressOptions, compress
    from compressor.progress import progress_bars

    opts = CompressOptions(
        model=model,
        output=output,
        method=method,
        ratio=ratio,
        data=data,
        calib_samples=calib_samples,
        arch=arch,
        input_shape=input_shape,
        trust_pickle=trust_pickle,
        seed=seed,
        provider=provider,
        rank=rank,
        energy=energy,
        schemes=tuple(schemes) or ("channel", "spatial"),
        rank_multiple=rank_multiple,
        sketches=sketches,
        sketch_rows=sketch_rows,
        refit=not no_refit,
        threshold=threshold,
        tolerance=tolerance,
        criterion=criterion,
        ranking="global" if global_ranking else "per-layer",
        min_channels_fraction=min_channels_fraction,
        channel_multiple=channel_multiple,
        lsh_bits=lsh_bits,
        lsh_tables=lsh_tables,
        asymmetric=asymmetric,
        speedup=speedup,
        batch=batch,
        threads=threads,
        quantize=quantize,
    )
    with progress_bars(enabled=not quiet and not as_json) as progress:
        result = compress(opts, progress)
    if as_json:
        click.echo(
            report.to_json(
                {
                    "output": str(result.output),
                    "before": result.before,
                    "after": result.after,
                    "ratio_requested": result.ratio_requested,
                    "ratio_reached": result.ratio_reached,
                    "verification": result.verification,
                    "speed": None if result.speed is None else result.speed.as_dict(),
                    "stages": result.stages,
                    "timings": result.timings,
                    "notes": result.notes,
                    "layers": [layer.as_dict() for layer in result.layers],
                }
            )
        )
        return
    if quiet:
        return
    stdout.print(report.layer_table(result.layers, title=f"{method}: layers"))
    stdout.print(
        report.summary_table(
            result.before,
            result.after,
            # under --speedup without --ratio there is no MACs target to be met or missed
            requested_ratio=None if speedup is not None and ratio is None
            else result.ratio_requested,
            ratio_of="macs",
            output_error=result.verification.relative_error,
            agreement=result.verification.agreement,
            samples=result.verification.samples,
            cosine_mean=result.verification.cosine_mean,
            cosine_min=result.verification.cosine_min,
        )
    )
    for note in result.notes:
        stdout.print(f"[yellow]note:[/] {note}", highlight=False)
    if verbose:
        stdout.print(
            "stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()),
            highlight=False,
        )
    if result.speed is not None:
        colour = {True: "green", False: "red", None: "default"}[result.speed.met]
        stdout.print(f"[{colour}]speed:[/] {result.speed.summary()}", highlight=False)
    stdout.print(f"wrote [bold]{result.output}[/]", highlight=False)


@main.command("evaluate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="The original model, to compare against (any format compress reads).",
)
@_apply(model_loading)
@click.option("--data", help="Evaluation data (.npz, image folder, fashion-mnist, digits).")
@click.option("--limit", type=int, help="Use only the first N samples of --data.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--batch-size",
    "batch_sizes",
    type=int,
    multiple=True,
    help="Batch sizes to time (default: 1 and 64).",
)
@click.option("--threads", type=int, help="onnxruntime intra-op threads.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also write a summary PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_friendly_errors
def evaluate_command(
    model,
    reference,
    arch,
    input_shape,
    trust_pickle,
    data,
    limit,
    provider,
    batch_sizes,
    threads,
    plot,
    as_json,
):
    """Accuracy, agreement, latency, size, parameters and MACs of MODEL (vs --reference)."""
    from compressor import io, report
    from compressor.data import load_data
    from compressor.evaluate import evaluate

    candidate = io.load_model(model, input_shape=input_shape)
    ref = None
    if reference is not None:  # with the candidate's shapes: the dims it fixed, fixed alike
        ref = io.load_model(
            reference,
            arch=arch,
            input_shape=input_shape or candidate.input_shape_option,
            trust_pickle=trust_pickle,
        )
    dataset = None
    if data is not None:
        dataset = load_data(data, split="test", limit=limit, input_shape=candidate.input_shape)
    kwargs = {"batch_sizes": tuple(batch_sizes)} if batch_sizes else {}
    result = evaluate(
        candidate,  # loaded: the dims --input-shape fixed stay fixed; file sizes are the files'
        reference=ref,
        data=dataset,
        provider=provider,
        threads=threads,
        progress=not as_json,
        plot_path=plot,
        candidate_name=Path(model).name,
        reference_name=None if reference is None else Path(reference).name,
        **kwargs,
    )
    if as_json:
        click.echo(report.to_json(result.to_dict()))
        return
    stdout.print(report.evaluation_table(result))


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@_apply(model_loading)
@click.option("--zoo", "list_zoo", is_flag=True, help="List the model zoo instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
@_friendly_errors
def inspect_command(model, arch, input_shape, trust_pickle, list_zoo, as_json):
    """Per-layer ops, shapes, parameters and MACs of MODEL."""
    from compressor import io, report
    from compressor.pipeline import read_recipe
    from compressor.profile import profile_model

    if list_zoo:
        from compressor.models import zoo

        for name in zoo.names():
            entry = zoo.get(name)
            stdout.print(f"[bold]{name}[/]  {entry.description}", highlight=False)
        return
    if model is None:
        raise OptionError("give a MODEL to inspect (or --zoo to list the model zoo)")
    loaded = io.load_model(model, arch=arch, input_shape=input_shape, trust_pickle=trust_pickle)
    size = Path(model).stat().st_size if Path(model).is_file() else None
    profile = profile_model(loaded.proto, file_bytes=size)
    recipe = read_recipe(loaded.proto)
    from compressor.passes.quantize import int8_nodes

    int8 = int8_nodes(loaded.proto)
    if as_json:
        click.echo(report.to_json({"profile": profile, "recipe": recipe, "int8_nodes": int8}))
        return
    stdout.print(report.profile_table(profile, title=str(model)))
    if int8:
        stdout.print(f"int8 nodes ({len(int8)}): {', '.join(int8)}", highlight=False)
    if recipe is not None:
        stdout.print(
            f"compressed by compressor {recipe['versions'].get('compressor')}: "
            f"method {recipe['method']}, MACs ratio {recipe['ratio_reached']:.3f}",
            highlight=False,
        )


@main.command("precision")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Data whose samples feed the layers, as compress --data.")
@_apply(model_loading)
@click.option("--algorithms", default="direct,im2col,winograd2,winograd4,fft,svd,log,log-add",
              show_default=True, help="Algorithms to measure (comma list).")
@click.option("--precisions", default="fp32,fp16,bf16,int8", show_default=True,
              help="Number formats to emulate (comma list).")
@click.option("--ranks", default="0.25,0.5", show_default=True,
              help="svd: ranks as fractions of each layer's full rank, in (0, 1].")
@click.option("--layers", help="Only these layers (comma list of node names).")
@click.option("--samples", type=int, default=8, show_default=True,
              help="Samples of --data fed to the layers.")
@click.option("--json", "json_path", is_flag=False, flag_value="-", metavar="[PATH]",
              help="Write the study as JSON to PATH (atomically), or print it with no PATH.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Write error vs precision, one line per algorithm, as a PNG here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or table.")
@_friendly_errors
def precision_command(model, data, arch, input_shape, trust_pickle, algorithms, precisions, ranks,
                      layers, samples, json_path, plot, quiet):
    """Each layer's output error per algorithm (direct, im2col, Winograd, FFT, SVD, log-domain)
    and precision (fp32, fp16, bf16, int8), against a float64 direct reference."""
    from compressor import precision, report
    from compressor.progress import progress_bars

    config = precision.PrecisionConfig(
        algorithms=tuple(algorithms.split(",")), precisions=tuple(precisions.split(",")),
        ranks=precision.parse_ranks(ranks), samples=samples,
        layers=None if layers is None else tuple(layers.split(",")))
    to_stdout = json_path == "-"
    json_file = None if json_path in (None, "-") else Path(json_path)
    precision.check_output(json_file, "--json")
    precision.check_output(plot, "--plot", ".png")
    with progress_bars(enabled=not quiet and not to_stdout) as progress:
        study = precision.run_study(model, data, config, arch=arch, input_shape=input_shape,
                                    trust_pickle=trust_pickle, progress=progress)
    if json_file is not None:
        precision.write_json(study, json_file)
    if plot is not None:
        precision.plot_study(study, plot)
    if to_stdout:
        click.echo(report.to_json(study.to_dict()))
        return
    if quiet:
        return
    stdout.print(precision.results_table(study))
    for path in (json_file, plot):
        if path is not None:
            stdout.print(f"wrote [bold]{path}[/]", highlight=False)


def _float_list(ctx, param, value):
    if value is None:
        return ()
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}': give comma-separated numbers, e.g. 0.75,0.5") from None


def _sweep_value_lists():
    """One ``--NAME V1,V2`` option per method option a sweep can vary, with compress's help."""
    from compressor.sweep import SWEEP_OPTIONS

    compress_help = {p.name: p.help or "" for p in compress_command.params}
    compress_help["refit"] = "true,false. " + compress_help.get("no_refit", "")
    compress_help["ranking"] = "global,per-layer. " + compress_help.get("global_ranking", "")
    compress_help["asymmetric"] = "true,false. " + compress_help.get("asymmetric", "")
    return [
        click.option(
            f"--{name.replace('_', '-')}",
            f"sweep_{name}",
            metavar="V1,V2,...",
            help=f"Values to try (comma list). {compress_help.get(name, '')}".strip(),
        )
        for name in SWEEP_OPTIONS
    ]


@main.command("sweep")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--methods",
    required=True,
    help="Methods to sweep, comma-separated; join methods with + to chain them (prune+svd): "
    + ", ".join(_method_names())
    + ".",
)
@click.option("--ratios", callback=_float_list, help="MACs ratios to try, e.g. 0.75,0.5,0.25.")
@click.option(
    "--speedups",
    callback=_float_list,
    help="Latency targets to try (times faster than the original), for the methods that choose "
    "by measured latency.",
)
@click.option("--data", help="Calibration data, as compress --data.")
@click.option("--calib-samples", type=int, default=512, show_default=True)
@click.option(
    "--eval-data",
    help="Evaluation data, as evaluate --data (without it: random inputs, agreement only).",
)
@click.option("--eval-limit", type=int, help="Use only the first N samples of --eval-data.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Sweep folder: results.json, plots, report.html, models; rerunning resumes it.",
)
@_apply(model_loading)
@_apply(_sweep_value_lists())
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Trials compressed at once: 1 runs in this process, more on a local Ray.",
)
@click.option("--ray-address", help="Run on the Ray cluster at this address instead.")
@click.option(
    "--batch-size",
    "batch_sizes",
    type=int,
    multiple=True,
    help="Batch sizes to time (default: 1 and 64).",
)
@click.option("--threads", type=int, help="onnxruntime intra-op threads for timing (default: all).")
@click.option(
    "--speedup-batch",
    type=int,
    default=1,
    show_default=True,
    help="Batch size --speedups are met at (compress --batch).",
)
@click.option(
    "--latency-time",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds of timing per model and batch size.",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--retry-failed", is_flag=True, help="Run again the trials that failed before.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json's content.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display or table.")
@_friendly_errors
def sweep_command(
    model,
    methods,
    ratios,
    speedups,
    data,
    calib_samples,
    eval_data,
    eval_limit,
    output,
    arch,
    input_shape,
    trust_pickle,
    workers,
    ray_address,
    batch_sizes,
    threads,
    speedup_batch,
    latency_time,
    provider,
    retry_failed,
    as_json,
    quiet,
    **value_lists,
):
    """Compress MODEL with every combination of --methods, targets and method options; each
    trial is verified and evaluated against the original, and the results, the Pareto front
    and report.html are written to -o."""
    from compressor import report
    from compressor.sweep import SweepSpec, run_sweep, sweep_progress
    from compressor.sweep_report import REPORT_HTML

    options = tuple(
        (name.removeprefix("sweep_"), text) for name, text in value_lists.items() if text
    )
    spec = SweepSpec(
        model=model,
        output=output,
        methods=tuple(methods.split(",")),
        ratios=ratios,
        speedups=speedups,
        options=options,
        data=data,
        eval_data=eval_data,
        eval_limit=eval_limit,
        calib_samples=calib_samples,
        arch=arch,
        input_shape=input_shape,
        trust_pickle=trust_pickle,
        provider=provider,
        batch_sizes=tuple(batch_sizes) or (1, 64),
        threads=threads,
        latency_min_time_s=latency_time,
        speedup_batch=speedup_batch,
    )
    if not quiet and not as_json:
        for note in spec.notes():
            stderr.print(f"[yellow]note:[/] {note}", highlight=False)
    with sweep_progress(enabled=not quiet and not as_json) as observer:
        results = run_sweep(
            spec,
            workers=workers,
            ray_address=ray_address,
            retry_failed=retry_failed,
            observer=observer,
        )
    if as_json:
        click.echo(report.to_json(results))
        return
    if quiet:
        return
    stdout.print(_sweep_table(results))
    counts = results["counts"]
    stdout.print(
        f"{counts['done']} of {counts['trials']} trials done, {counts['failed']} failed; "
        f"wrote [bold]{Path(output) / REPORT_HTML}[/]",
        highlight=False,
    )


def _sweep_table(results):
    from rich.table import Table

    from compressor import report

    batches = [str(b) for b in results["sweep"]["batch_sizes"]]
    table = Table(title="sweep", title_justify="left", box=None, header_style="bold")
    for header in ("trial", "status", "MACs kept", "accuracy", "agreement",
                   *(f"speedup b{b}" for b in batches), "front"):
        table.add_column(header, justify="left" if header in ("trial", "status") else "right")
    for t in results["trials"]:
        table.add_row(
            t["key"],
            t["status"] if t["status"] != "failed" else f"failed: {t.get('error', '')}",
            report.format_ratio(t.get("macs_ratio")),
            report.format_percent(t.get("accuracy")),
            report.format_percent(t.get("agreement")),
            *(report.format_ratio(t.get("speedup", {}).get(b)) for b in batches),
            " ".join(f"b{b}" for b in t.get("pareto", [])),
        )
    return table


def compress_main():
    """The ``compress`` console script: the same as ``compressor compress``."""
    sys.exit(compress_command.main(prog_name="compress"))


if __name__ == "__main__":  # pragma: no cover
    main()
