"""``make reproduce``: every headline claim's preset run as one sweep, then a report against the papers' numbers.

    python -m instill.reproduce [--seeds N] [--scale cpu|paper] [--claims ID,...] [--manifest reproduce.yaml]
                                [--executor auto|local|slurm] [--workers N] [--report-only]

The claims are declared in one manifest (``reproduce.yaml``): the config and stage that test each, the metric, the
two result rows compared (treatment against control, e.g. ``subnet`` against ``random_init``), the direction and
size of effect that counts, and the paper's values. Every config runs once per seed (seeds 1..N, each a whole
pipeline: its base and mask or trained guide are the point's own, seeded from it) as one sweep in
``checkpoints/reproduce/<scale>-seeds<N>/``; claims on one config share its runs. Then
``reports/reproduce/index.md`` and ``index.html`` give, per claim, the paper's number, ours (mean, standard
deviation and every seed's value), the verdict and a plot. Verdicts: ``reproduced`` (our effect reaches the
claim's margin in the paper's direction), ``contradicted`` (as far the other way), ``not at this scale`` (in
between), ``not run`` (no finished run: the failure is listed). ``--scale paper`` runs the claims that have a
``paper_config`` (a GPU cluster: the sweep's executor is auto); the report marks the claims that ran at paper scale.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m instill.reproduce: nothing below runs in this copy
    from instill.errors import run_module

    run_module("instill.reproduce")

import argparse
import html
import statistics
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import read_yaml
from .errors import UserError, exit_code_of
from .registry import describe_error

SCALES = ("cpu", "paper")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PaperValues(_Strict):
    treatment: Optional[float] = None
    control: Optional[float] = None
    source: str


class Claim(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    system: str
    claim: str
    config: str
    stage: str
    paper_config: Optional[str] = None
    metric: str
    where: dict[str, Any] = Field(default_factory=dict)
    treatment: dict[str, Any]
    control: dict[str, Any]
    better: Literal["higher", "lower"] = "higher"
    margin: float = Field(gt=0)
    paper: PaperValues
    plot: dict[str, str] = Field(default_factory=dict)
    note: Optional[str] = None

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, name: str) -> str:
        from .stages.runner import STAGES

        return STAGES.known(name)

    def config_for(self, scale: str) -> Optional[str]:
        return self.config if scale == "cpu" else self.paper_config


class Manifest(_Strict):
    claims: list[Claim] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self):
        ids = [c.id for c in self.claims]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"claim id {duplicates[0]!r} is used twice")
        return self


def load_manifest(path: str | Path, only: Optional[list[str]] = None) -> Manifest:
    """The validated manifest, restricted to the ``only`` claim ids when given.

    Raises:
        UserError: unreadable or invalid manifest, a config file that does not exist, an unknown claim id.
    """
    try:
        manifest = Manifest.model_validate(read_yaml(path))
    except ValidationError as err:
        raise UserError(f"{path}: {describe_error(err, Manifest)}") from None
    for claim in manifest.claims:
        for config in filter(None, (claim.config, claim.paper_config)):
            if not Path(config).is_file():
                raise UserError(f"{path}: claim {claim.id}: config {config} does not exist")
        check_claim_metric(claim, str(path))
    if only:
        known = {c.id for c in manifest.claims}
        unknown = [i for i in only if i not in known]
        if unknown:
            raise UserError(f"{path}: no claim {unknown[0]!r}; claims: {', '.join(sorted(known))}")
        manifest.claims = [c for c in manifest.claims if c.id in only]
    return manifest


# The splits a stage's result rows may hold figures of (``<split>_<figure>``; what each stage writes is its
# ``Stage.figures``). A claim naming a figure its stage never writes would run and find no value; --validate refuses
# it, naming the nearest names.
SPLITS = ("train", "train_full", "val", "test", "test_symbols", "textured", "shape_only", "cue_conflict")


def check_claim_metric(claim: Claim, source: str) -> None:
    """Refuse a claim whose metric its stage never writes (a typo would otherwise run and read nothing).

    Raises:
        UserError: naming the claim, the metric and the nearest names its stage writes.
    """
    from .stages.runner import get_stage

    figures = get_stage(claim.stage).figures
    if figures is None:  # a stage whose rows are not declared: its runs' rows are checked after they ran
        return
    names = [*figures.own, *(f"{split}_{figure}" for split in SPLITS for figure in figures.per_split)]
    if claim.metric in names or claim.metric.startswith(figures.prefixes):
        return
    from .errors import nearest

    hint = nearest(claim.metric, names, n=3)
    raise UserError(f"{source}: claim {claim.id}: its {claim.stage} stage writes no metric {claim.metric!r}"
                    + (f"; nearest: {', '.join(hint)}" if hint else ""))


def point_prefix(config: str) -> str:
    return Path(config).stem


def build_sweep(manifest: Manifest, scale: str, seeds: int, executor: str, workers: Optional[int]):
    """One sweep over every config the claims name at this scale, seeds 1..``seeds``, each point with its own
    upstream runs."""
    from .sweep import ExecutorSettings, SweepSpec

    configs: dict[str, str] = {}
    for claim in manifest.claims:
        config = claim.config_for(scale)
        if config is not None:
            configs.setdefault(config, claim.stage)
    if not configs:
        raise UserError(f"no claim has a {scale}-scale config")
    return SweepSpec(
        grid={"reproducibility.random_seed": list(range(1, seeds + 1))},
        points=[{"name": point_prefix(c), "config": c, "stage": stage} for c, stage in configs.items()],
        set={"reproducibility.reproduce": True}, upstream="per_point",
        executor=ExecutorSettings(kind=executor, workers=workers))


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def claim_result(claim: Claim, rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """Our numbers for one claim from a sweep's rows: per seed the treatment, control and effect (treatment -
    control), their means and standard deviations, and the verdict."""
    mine = [r for r in rows if str(r.get("point", "")).startswith(f"{prefix}-")]
    failed = [f"{r['point']}: {r.get('error') or r.get('state')}" for r in mine if r.get("state") != "finished"]

    def value(seed, side):
        for row in mine:
            if row.get("state") == "finished" and row.get("seed") == seed and \
                    all(row.get(k) == v for k, v in {**claim.where, **side}.items()):
                return row.get(claim.metric)
        return None

    per_seed = []
    for seed in sorted({r.get("seed") for r in mine if r.get("state") == "finished"}, key=str):
        t, c = value(seed, claim.treatment), value(seed, claim.control)
        if isinstance(t, (int, float)) and isinstance(c, (int, float)):
            per_seed.append({"seed": seed, "treatment": t, "control": c, "effect": t - c})
    ran = [r for r in mine if r.get("state") == "finished"]
    result: dict[str, Any] = {"per_seed": per_seed, "failed": failed, "n": len(per_seed), "ran": len(ran)}
    for key in ("treatment", "control", "effect"):
        values = [s[key] for s in per_seed]
        result[key] = statistics.fmean(values) if values else None
        result[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    result["verdict"] = verdict(claim, result["effect"])
    if result["effect"] is None and ran:  # the runs ran: say what is missing, never "not run"
        result["verdict"] = _missing(claim, ran)
    return result


def _missing(claim: Claim, ran: list[dict[str, Any]]) -> str:
    """Why finished runs gave no effect: the metric is in none of their rows, or no row matches a side."""
    from .errors import nearest

    names = sorted({k for r in ran for k, v in r.items() if isinstance(v, (int, float))})
    if not any(claim.metric in r for r in ran):
        hint = nearest(claim.metric, names, n=3)
        return f"no value: its runs finished but write no {claim.metric}" + (f" (nearest: {', '.join(hint)})"
                                                                               if hint else "")
    return "no value: its runs finished but no row matches its treatment and control in every seed"


def verdict(claim: Claim, effect: Optional[float]) -> str:
    """reproduced / contradicted / not at this scale, from our mean effect in the paper's direction against the
    claim's margin; not run without a number."""
    if effect is None:
        return "not run"
    toward = effect if claim.better == "higher" else -effect
    if toward >= claim.margin:
        return "reproduced"
    if toward <= -claim.margin:
        return "contradicted"
    return "not at this scale"


# ---------------------------------------------------------------------------------------------------------------
# The report


def _num(value: Optional[float], std: Optional[float] = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" + (f" ± {std:.2g}" if std is not None else "")


def write_report(manifest: Manifest, sweeps: dict[str, Path], out: Path, source: str = "reproduce.yaml"
                 ) -> dict[str, dict[str, Any]]:
    """``index.md`` and ``index.html`` in ``out`` (with one plot per claim and scale), from the sweeps that ran.

    Args:
        manifest: the claims.
        sweeps: scale -> sweep directory (a scale that did not run is absent).
        out: the report folder (created).
        source: the manifest's path, named in the report.
    Returns:
        claim id -> {scale -> result} (see ``claim_result``).
    """
    from .report import plot_sweep, sweep_rows

    out.mkdir(parents=True, exist_ok=True)
    rows = {scale: sweep_rows(path) for scale, path in sweeps.items()}
    results: dict[str, dict[str, Any]] = {}
    for claim in manifest.claims:
        results[claim.id] = {}
        for scale in SCALES:
            config = claim.config_for(scale)
            if scale not in rows or config is None:
                continue
            sweep_rows_, keys = rows[scale]
            prefix = point_prefix(config)
            result = claim_result(claim, sweep_rows_, prefix)
            x = claim.plot.get("x")
            # the rows the claim reads (its where, but along the plot's x), one bar or line per treatment / control
            # key value (condition, rule, variant, ...)
            where = {k: v for k, v in claim.where.items() if k != x}
            mine = [r for r in sweep_rows_ if str(r.get("point", "")).startswith(f"{prefix}-")
                    and (r.get("state") != "finished" or all(r.get(k) == v for k, v in where.items()))]
            sides = {*claim.treatment, *claim.control}
            picture = plot_sweep(out / f"{claim.id}-{scale}.png", mine, [k for k in keys if k in sides or k == x],
                                 claim.metric, x if x in keys else None)
            result["plot"] = picture.name if picture else None
            result["config"] = config
            results[claim.id][scale] = result
    (out / "index.md").write_text(_markdown(manifest, results, source))
    (out / "index.html").write_text(_html(manifest, results, source))
    return results


def _summary_rows(manifest: Manifest, results: dict[str, dict[str, Any]]) -> list[list[str]]:
    table = []
    for claim in manifest.claims:
        for scale, r in results[claim.id].items() or [("cpu", None)]:
            paper = claim.paper
            paper_effect = None if paper.treatment is None or paper.control is None else \
                paper.treatment - paper.control
            ours = "not run" if r is None or (r["n"] == 0 and not r.get("ran")) else "no value" if r["n"] == 0 else \
                f"{_num(r['treatment'], r['treatment_std'])} vs {_num(r['control'], r['control_std'])} " \
                f"(effect {_num(r['effect'], r['effect_std'])}, {r['n']} seed{'s' if r['n'] != 1 else ''})"
            table.append([claim.id, scale, f"{_num(paper.treatment)} vs {_num(paper.control)}"
                          + (f" (effect {_num(paper_effect)})" if paper_effect is not None else ""), ours,
                          r["verdict"] if r else "not run"])
    return table


HEAD = ["claim", "scale", "paper (treatment vs control)", "ours (mean ± std over seeds)", "verdict"]


def _markdown(manifest: Manifest, results: dict[str, dict[str, Any]], source: str) -> str:
    lines = ["# Reproduction report", "",
             f"Generated by `make reproduce` (`python -m instill.reproduce`) from `{source}`. Effect = "
             "treatment - control of the claim's metric; verdict against the claim's margin in the paper's "
             "direction. Scale `paper` marks a claim that ran at paper scale.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _summary_rows(manifest, results)]
    for claim in manifest.claims:
        lines += ["", f"## {claim.id}: {claim.system}", "", claim.claim, "",
                  f"- metric `{claim.metric}`" + (f" where {claim.where}" if claim.where else "") +
                  f": {claim.treatment} against {claim.control}, {claim.better} is better, margin {claim.margin}",
                  f"- paper: {_num(claim.paper.treatment)} vs {_num(claim.paper.control)} ({claim.paper.source})"]
        if claim.note:
            lines.append(f"- note: {claim.note}")
        if not results[claim.id]:
            lines.append("- ours: not run")
        for scale, r in results[claim.id].items():
            lines.append(f"- ours at {scale} scale (`{r['config']}`): **{r['verdict']}**; treatment "
                         f"{_num(r['treatment'], r['treatment_std'])}, control {_num(r['control'], r['control_std'])}"
                         f", effect {_num(r['effect'], r['effect_std'])}")
            for s in r["per_seed"]:
                lines.append(f"  - seed {s['seed']}: treatment {s['treatment']:.4g}, control {s['control']:.4g}, "
                             f"effect {s['effect']:.4g}")
            for failure in r["failed"]:
                lines.append(f"  - not finished: {failure}")
            if r["plot"]:
                lines += ["", f"![{claim.id} at {scale} scale]({r['plot']})"]
    return "\n".join(lines) + "\n"


def _html(manifest: Manifest, results: dict[str, dict[str, Any]], source: str) -> str:
    e = html.escape
    colour = {"reproduced": "#d4f4d4", "contradicted": "#f8d0d0", "not at this scale": "#fff1c4"}
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row[:-1]) +
                   f"<td style='background:{colour.get(row[-1], '#eee')}'>{e(row[-1])}</td></tr>"
                   for row in _summary_rows(manifest, results))
    parts = ["<!doctype html><meta charset='utf-8'><title>instill reproduction report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{border:1px solid #ccc;"
             "padding:4px 8px}table{border-collapse:collapse}</style>",
             f"<h1>Reproduction report</h1><p>Generated by <code>make reproduce</code> from <code>{e(source)}"
             "</code>. Effect = treatment - control; verdict against the claim's margin in the paper's direction."
             "</p>", "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEAD) + "</tr>" + rows + "</table>"]
    for claim in manifest.claims:
        parts.append(f"<h2>{e(claim.id)}: {e(claim.system)}</h2><p>{e(claim.claim)}</p><ul>"
                     f"<li>metric <code>{e(claim.metric)}</code> {e(str(claim.where or ''))}: "
                     f"{e(str(claim.treatment))} against {e(str(claim.control))}, {claim.better} is better, margin "
                     f"{claim.margin}</li><li>paper: {_num(claim.paper.treatment)} vs {_num(claim.paper.control)} "
                     f"({e(claim.paper.source)})</li>" + (f"<li>note: {e(claim.note)}</li>" if claim.note else ""))
        for scale, r in results[claim.id].items():
            seeds = ", ".join(f"seed {s['seed']}: {s['treatment']:.4g} vs {s['control']:.4g}" for s in r["per_seed"])
            parts.append(f"<li>ours at {scale} scale (<code>{e(r['config'])}</code>): <b>{e(r['verdict'])}</b>; "
                         f"effect {_num(r['effect'], r['effect_std'])} ({e(seeds)})</li>")
            parts += [f"<li>not finished: {e(f)}</li>" for f in r["failed"]]
        parts.append("</ul>")
        for scale, r in results[claim.id].items():
            if r["plot"]:
                parts.append(f"<img src='{e(r['plot'])}' alt='{e(claim.id)} {scale}'>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instill.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default="reproduce.yaml")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 1..N per claim (default 1)")
    parser.add_argument("--scale", choices=SCALES, default="cpu")
    parser.add_argument("--claims", help="comma-separated claim ids (default: all)")
    parser.add_argument("--executor", choices=["auto", "local", "slurm"], default="local")
    parser.add_argument("--workers", type=int, help="local executor: parallel points (default: the CPU cores)")
    parser.add_argument("--out", default="checkpoints/reproduce", help="folder of the sweeps")
    parser.add_argument("--report", default="reports/reproduce", help="folder of the report")
    parser.add_argument("--report-only", action="store_true", help="write the report from the sweeps that ran")
    parser.add_argument("--validate", action="store_true",
                        help="check the manifest and every claim's config at every seed, then exit")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: _reproduce_command(args), "interrupted: rerun the same command to resume")


def _reproduce_command(args: argparse.Namespace) -> int:
    from .sweep import prepare_spec, run_sweep

    if args.seeds < 1 or (args.workers is not None and args.workers < 1):
        raise UserError("--seeds and --workers must be at least 1")
    only = [c.strip() for c in args.claims.split(",")] if args.claims else None
    manifest = load_manifest(args.manifest, only)  # the claims to run; the report shows every claim
    sweep_dir = Path(args.out) / f"{args.scale}-seeds{args.seeds}"
    failed = 0
    if not args.report_only:
        spec = build_sweep(manifest, args.scale, args.seeds, args.executor, args.workers)
        sweep = prepare_spec(spec, f"{args.manifest} ({args.scale} scale)", sweep_dir)
        if args.validate:  # prepare_spec checked every point and wrote nothing
            print(f"{args.manifest}: {len(sweep.points)} valid points ({args.scale} scale, {args.seeds} seed(s))")
            return 0
        status = run_sweep(sweep)
        failed = sum(s["state"] != "finished" for s in status.values())
    sweeps = {scale: Path(args.out) / f"{scale}-seeds{args.seeds}" for scale in SCALES}
    sweeps = {scale: path for scale, path in sweeps.items() if (path / "sweep.json").is_file()}
    if not sweeps:
        raise UserError(f"no sweep in {args.out} for {args.seeds} seed(s): run without --report-only first")
    results = write_report(load_manifest(args.manifest), sweeps, Path(args.report), args.manifest)
    for claim_id, by_scale in results.items():
        if not by_scale:
            print(f"{claim_id}: not run")
        for scale, r in by_scale.items():
            print(f"{claim_id} ({scale}): {r['verdict']}; effect {_num(r['effect'], r['effect_std'])} over "
                  f"{r['n']} seed(s)")
    print(f"wrote {Path(args.report) / 'index.html'} and {Path(args.report) / 'index.md'}")
    return 1 if failed else 0
