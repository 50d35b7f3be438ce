"""What was rewritten and why: the objects ``explain`` returns and their printed form."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from . import mask_proofs, stats as _stats
from .options import Options


@dataclasses.dataclass
class Decision:
    kernel: str
    precision: str
    rank: str
    guards: Tuple[str, ...]
    reason: str
    site_id: str = ""
    # the precision ladder (cheapest first, the inputs' own last); run-time checks may move a
    # site up it: ``runtime()["precision"]`` counts the calls per rung actually used
    precisions: Tuple[str, ...] = ()

    @property
    def measured_error(self) -> Optional[float]:
        """Relative L2 error measured on sampled rows (None: exact path, nothing to measure)."""
        return _stats.stats().get(self.site_id, {}).get("measured_error")

    def __str__(self) -> str:
        return f"kernel={self.kernel} precision={self.precision} rank={self.rank} ({self.reason})"


@dataclasses.dataclass
class Site:
    id: str
    graph: str
    pattern: str
    location: str
    q_shape: Tuple[int, ...]
    k_shape: Tuple[int, ...]
    v_shape: Tuple[int, ...]
    dtype: str
    causal: bool
    mask: Optional[str]
    scale: Optional[float]
    dropout_p: float
    gqa_groups: int
    decision: Decision
    notes: Tuple[str, ...] = ()
    dynamic: bool = False

    def runtime(self) -> dict:
        return _stats.stats().get(self.id, {})


@dataclasses.dataclass
class SkippedSite:
    graph: str
    location: str
    what: str
    reason: str


@dataclasses.dataclass
class GraphRecord:
    name: str
    code_before: str
    code_after: str = ""
    sites: List[Site] = dataclasses.field(default_factory=list)
    skipped: List[SkippedSite] = dataclasses.field(default_factory=list)
    error: Optional[str] = None
    pass_seconds: float = 0.0
    inner_seconds: float = 0.0
    # kernels built on a thread during the inner compile (see prebuild.py): the jobs built,
    # their seconds, the seconds the compile waited for them after its own work, failures
    prebuilt: int = 0
    prebuild_seconds: float = 0.0
    prebuild_wait_seconds: float = 0.0
    prebuild_errors: List[str] = dataclasses.field(default_factory=list)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _fmt_scale(scale) -> str:
    return "1/sqrt(D)" if scale is None else f"{scale:.6g}"


class Report:
    def __init__(self, graphs: List[GraphRecord], options: Options):
        self.graphs = graphs
        self.options = options

    @property
    def sites(self) -> List[Site]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def skipped(self) -> List[SkippedSite]:
        return [s for g in self.graphs for s in g.skipped]

    @property
    def failures(self) -> List[Tuple[str, str]]:
        return [(g.name, g.error) for g in self.graphs if g.error]

    @property
    def pass_seconds(self) -> float:
        return sum(g.pass_seconds for g in self.graphs)

    @property
    def inner_seconds(self) -> float:
        return sum(g.inner_seconds for g in self.graphs)

    def summary(self) -> str:
        return (f"adaattn: {len(self.graphs)} graph(s), {len(self.sites)} attention site(s) "
                f"rewritten, {len(self.skipped)} look-alike(s) skipped, "
                f"{len(self.failures)} graph(s) failed and left unchanged")

    def format_sites(self, runtime: bool = True) -> str:
        lines = []
        for site in self.sites:
            d = site.decision
            lines.append(f"[{site.id}] {site.graph}  {site.location}")
            lines.append(f"  pattern   {site.pattern}")
            lines.append(f"  shapes    q {_fmt_shape(site.q_shape)}  k {_fmt_shape(site.k_shape)}  "
                         f"v {_fmt_shape(site.v_shape)}  {site.dtype}"
                         + ("  (dynamic)" if site.dynamic else ""))
            lines.append(f"  attention causal={site.causal} mask={site.mask} "
                         f"scale={_fmt_scale(site.scale)} dropout_p={site.dropout_p:g} "
                         f"gqa_groups={site.gqa_groups}")
            if site.notes:
                lines.append(f"  notes     {'; '.join(site.notes)}")
            lines.append(f"  decision  {d}")
            lines.append(f"  guards    {' '.join(d.guards)}")
            if runtime:
                rt = site.runtime()
                if rt:
                    err = rt.get("measured_error")
                    lines.append(
                        f"  runtime   calls={rt['calls']} backward={rt['backward_calls']} "
                        f"kernel={_counts(rt['kernel'])} precision={_counts(rt['precision'])} "
                        f"rank={_counts(rt['rank'])} demotions={rt['demotions']} "
                        f"error={'exact' if err is None else f'{err:.2e}'}")
                    if rt.get("heads"):
                        lines.append(_format_heads(rt))
                    if rt.get("precision_checks") or rt.get("precision_demotions"):
                        lines.append(_format_precision(rt))
                    proven = rt.get("run_time_masks")
                    if proven:
                        lines.append(f"  masks     proven at run time, not read: "
                                     f"{_counts(proven)} calls")
                    misses = rt.get("run_time_mask_misses")
                    if misses:
                        stopped = (", checks stopped" if mask_proofs.given_up(site.id)
                                   else "")
                        lines.append(f"  masks     checked at run time, not provable: "
                                     f"{misses} calls{stopped}")
                    for reason in rt["fallbacks"]:
                        lines.append(f"  fallback  {reason}")
        return "\n".join(lines)

    def format_skipped(self) -> str:
        lines = [f"{s.graph}  {s.location}  {s.what}: {s.reason}" for s in self.skipped]
        lines += [f"{name}  rewrite failed, compiled unchanged: {err}" for name, err in self.failures]
        return "\n".join(lines)

    def format_graphs(self) -> str:
        parts = []
        for g in self.graphs:
            parts.append(f"--- {g.name} before ---\n{g.code_before.strip()}")
            parts.append(f"--- {g.name} after ---\n{g.code_after.strip()}")
        return "\n".join(parts)

    def __str__(self) -> str:
        out = [self.summary(), f"options: {self.options.describe()}"]
        times = (f"pass time {self.pass_seconds * 1e3:.1f} ms, inner compile "
                 f"{self.inner_seconds * 1e3:.1f} ms")
        prebuilt = sum(g.prebuilt for g in self.graphs)
        errors = [e for g in self.graphs for e in g.prebuild_errors]
        if prebuilt or errors:
            times += (f", {prebuilt} kernel call(s) prebuilt alongside it "
                      f"({sum(g.prebuild_seconds for g in self.graphs):.2f} s, "
                      f"{sum(g.prebuild_wait_seconds for g in self.graphs):.2f} s waited after it"
                      + (f"; {len(errors)} failed: {errors[0]}" if errors else "") + ")")
        out.append(times)
        if self.sites:
            out += ["", "Sites", self.format_sites()]
        if self.skipped or self.failures:
            out += ["", "Skipped", self.format_skipped()]
        out += ["", "Graphs", self.format_graphs()]
        return "\n".join(out)

    __repr__ = __str__


def _format_heads(rt: dict) -> str:
    """Per query head: in how many of its low-rank calls it kept the low-rank output, the last
    check's error, the attention's normalised entropy (H) and the effective rank of its keys'
    centred Gram (Krank: 1 = one direction of variance, D = all alike)."""
    parts = []
    for head, row in sorted(rt["heads"].items()):
        err, entropy, k_rank = row["error"], row["entropy"], row.get("k_rank")
        parts.append(f"h{head} {row['low_rank']}/{row['low_rank'] + row['exact']} "
                     f"err={'nan' if err is None or err != err else f'{err:.1e}'} "
                     f"H={'-' if entropy is None else f'{entropy:.3f}'} "
                     f"Krank={'-' if k_rank is None else f'{k_rank:.1f}'}")
    return (f"  heads     kept low rank (rank {rt['low_rank_rank']}) / low-rank calls: "
            + ", ".join(parts))


def _format_precision(rt: dict) -> str:
    """The precision checks: the last error each rung measured on sampled rows, and the
    demotions (a rung whose check failed, and the rung the site moved up to)."""
    errors = ", ".join(f"{p} {e:.1e}" for p, e in rt["precision_errors"].items())
    line = f"  precision checks={rt['precision_checks']} error: {errors or '-'}"
    if rt["precision_demotions"]:
        line += "; demoted " + "; ".join(rt["precision_demotions"])
    return line


def _counts(counter: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(counter.items())) or "-"
