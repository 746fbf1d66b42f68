"""bench/throughput.py's figures (the issue's done-when numbers, reported, never asserted) and
its Markdown page, both read from the report dict that becomes throughput.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {
    "lora_k4_over_k1": 2.5,
    "dreamsweep_lora_over_diffusers": 1.4,
    "dreamsweep_lora_compiled_over_diffusers": 1.4,
}


def case(cases: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The case `name` when it ran (status ok), else None."""
    found = [c for c in cases if c.get("case") == name and c.get("status") == "ok"]
    return found[0] if found else None


def _ratio(
    top: dict[str, Any] | None, bottom: dict[str, Any] | None, key: str, target: float | None
) -> dict[str, Any]:
    if top is None or bottom is None:
        missing = [n for n, c in (("numerator", top), ("denominator", bottom)) if c is None]
        return {"value": None, "target": target, "why_missing": f"{' and '.join(missing)} not run"}
    value = top[key] / bottom[key]
    return {
        "value": value,
        "target": target,
        "met": None if target is None else value >= target,
        "of": f"{top['case']} {key} / {bottom['case']} {key}",
    }


def figures(report: dict[str, Any]) -> dict[str, Any]:
    cpu = report["cases"]
    peer = report.get("peer", {}).get("cases", [])
    out = {
        "lora_k4_over_k1": _ratio(
            case(cpu, "pack_lora_k4"),
            case(cpu, "pack_lora_k1"),
            "trial_steps_per_s",
            TARGETS["lora_k4_over_k1"],
        ),
        "lora_k4_over_lone_lora": _ratio(
            case(cpu, "pack_lora_k4"), case(cpu, "lora"), "trial_steps_per_s", None
        ),
        "ti_k4_over_k1": _ratio(
            case(cpu, "pack_textual_inversion_k4"),
            case(cpu, "pack_textual_inversion_k1"),
            "trial_steps_per_s",
            None,
        ),
        "dreamsweep_lora_over_diffusers": _ratio(
            case(peer, "dreamsweep_lora"),
            case(peer, "diffusers_lora"),
            "steps_per_s",
            TARGETS["dreamsweep_lora_over_diffusers"],
        ),
        "dreamsweep_lora_compiled_over_diffusers": _ratio(
            case(peer, "dreamsweep_lora_compiled"),
            case(peer, "diffusers_lora"),
            "steps_per_s",
            TARGETS["dreamsweep_lora_compiled_over_diffusers"],
        ),
        "lora_compiled_over_lora": _ratio(
            case(cpu, "lora_compiled"), case(cpu, "lora"), "steps_per_s", None
        ),
        "dreamsweep_ti_over_diffusers": _ratio(
            case(peer, "dreamsweep_textual_inversion"),
            case(peer, "diffusers_textual_inversion"),
            "steps_per_s",
            None,
        ),
        "dreamsweep_dreambooth_over_diffusers": _ratio(
            case(peer, "dreamsweep_dreambooth"),
            case(peer, "diffusers_dreambooth"),
            "steps_per_s",
            None,
        ),
    }
    eager, compiled = case(cpu, "lora"), case(cpu, "lora_compiled")
    # The same trial (seed, steps) eager and compiled: its last loss agrees to rounding.
    out["lora_compiled_last_loss_relative_difference"] = {
        "value": None
        if eager is None or compiled is None
        else abs(compiled["final_loss"] - eager["final_loss"]) / abs(eager["final_loss"]),
    }
    forked = case(cpu, "forked_worker_lora")
    out["warm_forked_worker_first_step_s"] = {
        "value": forked["first_step_s"] if forked else None,
        "cold_value": forked["cold_first_step_s"] if forked else None,
    }
    return out


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _case_rows(cases: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| case | members | steps/s | trial-steps/s | peak MiB (what) | first step s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        if c.get("status") != "ok":
            rows.append(f"| {c['case']} | - | - | - | - | - | {c['status']}: {c['reason']} |")
        elif "steps_per_s" in c:
            note = c.get("note") or c.get("optimizer") or c.get("source") or ""
            rows.append(
                f"| {c['case']} | {c.get('members', 1)} | {_number(c['steps_per_s'])} | "
                f"{_number(c['trial_steps_per_s'])} | {_number(c['peak_memory_mib'], 0)} "
                f"({c['peak_memory_source']}) | {_number(c.get('first_step_s'))} | {note} |"
            )
    return rows


def _evaluation_rows(cases: list[dict[str, Any]]) -> list[str]:
    rows = []
    for c in cases:
        if c.get("status") == "ok" and "generation_images_per_s" in c:
            rows.append(
                f"Evaluation ({c['case']}): {c['images']} images a call, {c['scheduler']}, "
                f"{c['num_inference_steps']} steps, guidance {c['guidance_scale']}: "
                f"**{_number(c['generation_images_per_s'])} images/s** generating, "
                f"{_number(c['evaluation_images_per_s'])} images/s with the metrics "
                f"({', '.join(c['metrics'])}); peak {_number(c['peak_memory_mib'], 0)} MiB "
                f"({c['peak_memory_source']})."
            )
    return rows


def _figure_rows(figures: dict[str, Any]) -> list[str]:
    rows = ["| figure | value | target | |", "|---|---|---|---|"]
    for name, f in figures.items():
        if "target" not in f:
            continue
        target = "-" if f["target"] is None else f"≥ {f['target']}"
        status = f.get("why_missing") or {True: "met", False: "missed", None: ""}[f.get("met")]
        rows.append(f"| {name} | {_number(f['value'])} | {target} | {status} |")
    loss = figures["lora_compiled_last_loss_relative_difference"]["value"]
    shown = "-" if loss is None else f"{loss:.1e}"
    rows.append(f"| lora_compiled: last loss vs eager's (relative difference) | {shown} | - | |")
    forked = figures["warm_forked_worker_first_step_s"]
    rows.append(
        f"| warm forked worker: start → first step (s) | {_number(forked['value'])} | - | "
        f"cold (first fork, starts the server): {_number(forked['cold_value'])} s |"
    )
    return rows


def write_markdown(report: dict[str, Any], path: Path) -> None:
    m = report["machine"]
    s = report["settings"]
    device = m["device"] + (
        f", {m['device_memory_gib']:.0f} GiB" if "device_memory_gib" in m else ""
    )
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        "# Training throughput (bench/throughput.py)",
        "",
        f"`{report['command']}` on {report['date']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable, torch uses "
        f"{m['torch_threads']} threads), {m['memory_gib']:.0f} GiB; device: {device}; load "
        f"average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}. "
        f"Python {m['python']}; {versions}.",
        "",
        f"Cases: `{s['base_model']}` model, {s['resolution']} px, LoRA rank {s['rank']}, batch "
        f"{s['batch_size']} per trial, {s['steps']} timed steps after {s['warmup_steps']} "
        "warm-up steps (steady-state steps/s leaves the warm-up out). A pack's trial-steps/s "
        "is its steps/s × members. Peak memory: CUDA's max allocated on a GPU, else the peak "
        "RSS of the process (reset before each in-process case). First step: from the start of "
        "the worker (in-process: the training call) to its first optimizer step.",
        "",
        "## Figures",
        "",
        *_figure_rows(report["figures"]),
        "",
        "## dreamsweep (this venv)",
        "",
        *_case_rows(report["cases"]),
        "",
        *_evaluation_rows(report["cases"]),
    ]
    peer = report.get("peer")
    if peer is not None:
        lines += ["", "## Beside diffusers' example scripts (the peer venv)", ""]
        lines += [peer.get("about", "")] if peer.get("about") else []
        if peer.get("status") != "ok":
            lines += [f"Not run: {peer.get('reason')}"]
        else:
            lines += ["", *_case_rows(peer["cases"])]
    gpu = report.get("gpu")
    if gpu is not None:
        lines += ["", "## GPU (SD 1.5's architecture, random weights, 512 px, bf16)", ""]
        lines += [gpu.get("about") or f"Not run: {gpu.get('reason')}"]
        lines += ["", *_case_rows(gpu.get("cases", [])), ""]
        lines += _evaluation_rows(gpu.get("cases", []))
    profile = report.get("profile")
    if profile:
        from throughput_profile import profile_lines

        lines += ["", "## Profile of the LoRA step (what limits packing)", ""]
        lines += profile_lines(profile)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
