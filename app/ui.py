"""The browser workbench (Gradio Blocks): one generated form per plugin, a live Jobs view and
the Registry with lineage graphs.

Every handler is a plain function over the lab, calling the same functions as the CLI
(`app.jobs.submit`, `app.jobs.cancel`, the registry), so a refresh, a second tab or a server
restart shows the same state: nothing lives in the server's memory. No torch import here.
"""

import json
from datetime import datetime
from pathlib import Path


import plugins
from app import auth, forms
from app import jobs as jobs_mod
from app.auth import NotAllowed
from app.checkpoints import import_checkpoint, to_json
from app.lab import Lab
from app.scheduler import log_tail
from plugins.kit import markup
from registry import CheckpointError, RefError, RegistryError

JOB_COLUMNS = ["id", "plugin", "status", "progress", "user", "device", "duration", "created"]
CK_COLUMNS = ["id", "name", "relation", "parents", "params", "size", "scores", "job"]
LOG_LINES = 60


# ------------------------------------------------------------------------------ plugin forms
def preview_data(lab: Lab, plugin_name: str, values: list) -> str:
    """The plugin's data preview for the form as filled in (markdown)."""
    specs = forms.form_spec(plugins.get(plugin_name).Config)
    try:
        return jobs_mod.preview(lab, plugin_name, forms.values_to_config(specs, list(values)))
    except forms.FormError as e:
        return f"**No preview.**\n\n- {markup.md(e)}"
    except plugins.ConfigError as e:
        return "**No preview: fix these fields.**\n\n" + markup.lines(e.problems)


def submit_form(lab: Lab, plugin_name: str, values: list,
                user: str | None = None) -> tuple[str, str]:
    """Submit a form; returns (markdown message, job id or "")."""
    plugin = plugins.get(plugin_name)
    specs = forms.form_spec(plugin.Config)
    try:
        data = forms.values_to_config(specs, list(values))
        job = jobs_mod.submit(lab, plugin_name, data, user=user)
    except forms.FormError as e:
        return f"**Not submitted.**\n\n- {markup.md(e)}", ""
    except plugins.ConfigError as e:
        return "**Not submitted: fix these fields.**\n\n" + markup.lines(e.problems), ""
    return f"Queued **{job['id']}**. Follow it in the Jobs tab.", job["id"]


def preview(plugin_name: str, values: list) -> str:
    plugin = plugins.get(plugin_name)
    try:
        data = forms.values_to_config(forms.form_spec(plugin.Config), list(values))
    except forms.FormError as e:
        return f"# {e}\n"
    return (f"# {plugin_name}.yaml  (run it with: weightsmith run {plugin_name} "
            f"{plugin_name}.yaml --wait)\n" + forms.to_yaml(data))


def load_yaml(plugin_name: str, path: str | None) -> tuple[list | None, str]:
    """(form values, note) from a YAML file; values None (form unchanged) when unreadable."""
    plugin = plugins.get(plugin_name)
    specs = forms.form_spec(plugin.Config)
    if not path:
        return None, ""
    try:
        data = jobs_mod.load_config_file(path)  # the same reader as `weightsmith run`
    except plugins.ConfigError as e:
        return None, "**Could not load the file:** " + markup.md("; ".join(e.problems))
    unknown = forms.unknown_keys(specs, data)
    note = f"Loaded {markup.md(Path(path).name)}."
    if unknown:
        note += f" **Not in this form (ignored): {markup.md(', '.join(unknown))}**"
    return forms.config_to_values(specs, data), note


def checkpoint_choices(lab: Lab) -> list[tuple[str, str]]:
    with lab.registry() as reg:
        rows = reg.list_checkpoints(limit=500)
    return [(f"{r['name']} ({r['id']})", r["id"]) for r in rows]


# ------------------------------------------------------------------------------------ jobs
def _duration(job: dict) -> str:
    if not job["started_at"]:
        return ""
    start = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")) \
        if job["finished_at"] else datetime.now(start.tzinfo)
    return f"{(end - start).total_seconds():.0f} s"


def gpu_summary() -> str:
    """One line per GPU for the Jobs view (nvidia-smi), or a note that there is none."""
    from app.scheduler import gpu_status

    rows = gpu_status()
    if not rows:
        return "GPUs: none found (nvidia-smi absent or reports none); jobs run on the CPU."

    def fmt(x, unit):
        return ("?" if x is None else f"{x:.0f}") + unit

    return "GPUs: " + " · ".join(
        f"**{r['index']}** {r['name']}: {fmt(r['memory_used_mib'], '')}/"
        f"{fmt(r['memory_total_mib'], ' MiB')}, {fmt(r['utilization_pct'], '%')} busy"
        for r in rows)


def job_table(lab: Lab) -> list[list]:
    from app.scheduler import queue_positions

    with lab.registry() as reg:
        rows = reg.jobs(limit=200)
        places = queue_positions(reg)
    return [[r["id"], r["plugin"],
             f"queued #{places[r['id']]}" if r["id"] in places else r["status"],
             f"{(r['progress'] or 0):.0%}", r["user"] or "",
             r["device"] or "", _duration(r), r["created_at"][:19].replace("T", " ")]
            for r in rows]


def job_detail(lab: Lab, job_id: str | None) -> tuple[str, str, str, object]:
    """(status markdown, progress bar HTML, log tail, metrics DataFrame) for one job."""
    import pandas as pd

    empty = pd.DataFrame({"step": [], "value": [], "name": []})
    if not job_id:
        return "Select a job in the table.", "", "", empty
    with lab.registry() as reg:
        job = reg.job(job_id, missing_ok=True)
        if job is None:
            return f"No job {markup.md(job_id)}.", "", "", empty
        metrics = reg.metrics(job_id)
        made = reg.job_checkpoints(job_id)
    pct = (job["progress"] or 0) * 100
    status = (f"**{markup.md(job['id'])}** · {markup.md(job['plugin'])} · "
              f"**{markup.md(job['status'])}** · device {markup.md(job['device'] or '-')} · "
              f"{_duration(job)}")
    if made:
        status += f"\n\nCheckpoints: {markup.md(', '.join(made))}"
    scores = [m for m in metrics if m["step"] is None]  # final numbers, e.g. evaluations
    if scores:
        status += "\n\n" + " · ".join(f"{markup.md(m['name'])} = {m['value']:.4g}"
                                        for m in scores[-8:])
    if job["error"] and job["status"] != "succeeded":
        status += "\n\n" + markup.code_block(job["error"][-2000:])
    pct = min(max(float(pct), 0.0), 100.0)
    bar = (f"<div class='ws-progress'><div style='width:{pct:.1f}%'></div></div>"
           f"<div>{pct:.0f}% {markup.html(job['progress_message'] or '')}</div>")
    log = ""
    if job["log_path"] and Path(job["log_path"]).exists():
        log = log_tail(job["log_path"], LOG_LINES)
    curves = [m for m in metrics if m["step"] is not None]  # e.g. a training loss per step
    frame = pd.DataFrame({"step": [m["step"] for m in curves],
                          "value": [m["value"] for m in curves],
                          "name": [m["name"] for m in curves]}) if curves else empty
    return status, bar, log, frame


def plotted_metrics(names: list[str], chosen: list[str] | None) -> list[str]:
    """The curves drawn: the user's choice, else the losses and perplexities (metrics of
    other scales, such as tokens/s or the learning rate, would flatten them), else all."""
    if chosen:
        return [n for n in chosen if n in names]
    default = [n for n in names if "loss" in n or "ppl" in n or "perplexity" in n]
    return default or names


def stop_job(lab: Lab, job_id: str | None, user: str | None = None) -> str:
    if not job_id:
        return "Select a job first."
    try:
        job = jobs_mod.cancel(lab, job_id, user=user)
    except NotAllowed as e:
        return f"**Not stopped.** {markup.md(e)}"
    except RegistryError as e:
        return f"**Not stopped.** {markup.md(e)}"
    return f"{markup.md(job_id)}: {markup.md(job['status'])}"


def delete_checkpoint_form(lab: Lab, ck_id: str | None, user: str | None = None) -> str:
    """Soft delete: hidden from the lists; its row, edges and scores stay for the lineage."""
    if not ck_id:
        return "Select a checkpoint first."
    try:
        row = auth.delete_checkpoint(lab, ck_id, user)
    except (NotAllowed, RegistryError) as e:
        return f"**Not deleted.** {markup.md(e)}"
    return (f"Deleted {markup.md(row['name'])} ({markup.md(row['id'])}); its lineage is kept "
            f"(deleted {row['deleted_at'][:19].replace('T', ' ')} by "
            f"{markup.md(row['deleted_by'])}).")


def request_user(request) -> str | None:
    """The logged-in user of a request (None in a lab without users)."""
    return getattr(request, "username", None) if request is not None else None


def retry_job(lab: Lab, job_id: str | None, user: str | None = None) -> tuple[str, str]:
    """Submit the selected job's config again, as a new job of whoever clicks (`user`),
    audited as theirs: a member's Retry of another's job is their own job."""
    if not job_id:
        return "Select a job first.", ""
    try:
        with lab.registry() as reg:
            job = reg.job(job_id)
        new = jobs_mod.submit(lab, job["plugin"], json.loads(job["config"]), user=user)
    except (plugins.ConfigError, plugins.PluginError, RegistryError) as e:
        return f"**Could not retry:** {markup.md(e)}", job_id
    return f"Re-submitted {markup.md(job_id)} as **{markup.md(new['id'])}**.", new["id"]


def resume_job(lab: Lab, job_id: str | None, user: str | None = None) -> tuple[str, str]:
    """Continue a cancelled or failed training job from its last saved state: the same
    config with `resume_job` set (plugins whose Config has that field). It reads the job's
    own saved state, so only the job's owner or an admin may resume it; the new job is the
    resumer's."""
    if not job_id:
        return "Select a job first.", ""
    try:
        with lab.registry() as reg:
            job = reg.job(job_id)
        auth.check_owner(lab, user, job["user"], f"resume job {job_id}")
    except (NotAllowed, RegistryError) as e:
        return f"**Not resumed.** {markup.md(e)}", job_id
    plugin = plugins.get(job["plugin"])
    if "resume_job" not in plugin.Config.model_fields:
        return f"{markup.md(job['plugin'])} jobs cannot be resumed; use Retry.", job_id
    if job["status"] not in ("cancelled", "failed", "interrupted"):
        return (f"{markup.md(job_id)} is {markup.md(job['status'])}; only a stopped job can be "
                f"resumed."), job_id
    config = json.loads(job["config"])
    config["resume_job"] = job_id
    try:
        new = jobs_mod.submit(lab, job["plugin"], config, user=user)
    except (plugins.ConfigError, plugins.PluginError) as e:
        return f"**Could not resume:** {markup.md(e)}", job_id
    return f"Resuming {markup.md(job_id)} as **{markup.md(new['id'])}**.", new["id"]


# -------------------------------------------------------------------------------- registry
def checkpoint_table(lab: Lab, search: str = "") -> list[list]:
    with lab.registry() as reg:
        rows = reg.list_checkpoints(search=search or None, limit=200)
    return [[r["id"], r["name"], r["relation"], ", ".join(r["parents"]),
             f"{r['param_count'] / 1e6:.2f}M" if r["param_count"] else "",
             f"{r['size_bytes'] / 2**20:.1f} MiB" if r["size_bytes"] else "",
             "; ".join(f"{k} = {v:.4g}" for k, v in r["scores"].items()), r["job_id"] or ""]
            for r in rows]


def checkpoint_detail(lab: Lab, ck_id: str | None) -> tuple[str, str, dict]:
    """(summary markdown, lineage graph markdown with a Mermaid diagram, details JSON)."""
    if not ck_id:
        return "Select a checkpoint in the table.", "", {}
    try:
        with lab.registry() as reg:
            row = to_json(reg.checkpoint(ck_id))
            parents = reg.parents(row["id"])
            evaluations = reg.evaluations(row["id"])
            deltas = reg.score_deltas(row["id"])
            graph = reg.lineage_mermaid(row["id"], max_depth=20)
    except RegistryError as e:
        return markup.md(e), "", {}
    md = markup.md  # every value below may be a member's text: shown literally
    summary = (f"### {md(row['name'])}  ({md(row['id'])})\n{md(row['relation'])} · "
               f"{md(row['architecture'] or '')} · "
               f"{(row['param_count'] or 0) / 1e6:.2f}M params · {md(row['dtype'] or '')} · "
               f"created {row['created_at'][:19].replace('T', ' ')} by "
               f"{md(row['created_by'] or '-')}"
               + (f" · job {md(row['job_id'])}" if row["job_id"] else ""))
    if parents:
        summary += "\n\nParents: " + ", ".join(
            f"{md(p['parent_name'])} ({md(p['relation'])}"
            + (f", weight {p['weight']:g}" if p["weight"] is not None else "")
            + (f", {md(p['role'])}" if p["role"] else "") + ")" for p in parents)
    if row.get("hub_repo") or row.get("sync_status"):
        summary += (f"\n\nHub: {md(row['hub_repo'] or '-')} · {md(row['sync_status'] or '-')}"
                    + (f" at {md(row['hub_commit'][:12])}" if row.get("hub_commit") else "")
                    + (f" · {md(row['sync_error'])}" if row.get("sync_status") == "sync_failed"
                       else ""))
    if not row["path"]:
        summary += "\n\nRemote only: no files in this lab (import its Hub id to get them)."
    if deltas:  # a table: one row per metric, one column per parent
        names = list(dict.fromkeys(d["parent_name"] for d in deltas))
        table: dict[str, dict] = {}
        for d in deltas:
            table.setdefault(d["metric"], {"value": d["value"]})[d["parent_name"]] = d["delta"]
        summary += ("\n\n**Scores against parents**\n\n| metric | value | "
                    + " | ".join(f"vs {md(n)}" for n in names) + " |\n|---|---|"
                    + "---|" * len(names) + "\n"
                    + "\n".join(f"| {md(m)} | {v['value']:.4g} | " + " | ".join(
                        f"{v[n]:+.4g}" if n in v else "" for n in names) + " |"
                        for m, v in table.items()))
    meta = to_json(row).get("metadata")
    numbers = lambda v: isinstance(v, list) and all(type(i) is int for i in v)  # noqa: E731
    if isinstance(meta, dict) and numbers(meta.get("layer_map")) and \
            numbers(meta.get("new_layers") or []):
        lm = meta["layer_map"]  # numbers only, so the code span shows them as they are
        summary += (f"\n\nLayer map ({len(lm)} layers; new layer i is a copy of old layer "
                    f"map[i]): `{lm}`" + (f" · new blocks {meta['new_layers']}"
                                          if meta.get("new_layers") else ""))
    if isinstance(meta, dict) and isinstance(meta.get("sparsity"), (int, float)):
        summary += (f"\n\n{md(meta.get('method', ''))} sparsity {meta['sparsity']:.1%}"
                    + (f" ({md(meta['pattern'])})" if meta.get("pattern") else ""))
    files = sorted(p.name for p in Path(row["path"]).iterdir()) if row["path"] and \
        Path(row["path"]).is_dir() else []
    details = {"config": row.get("config"), "versions": row.get("versions"),
               "metadata": row.get("metadata"), "content_hash": row["content_hash"],
               "folder": row["path"], "files": files,
               "evaluations": [{k: e[k] for k in ("task", "metric", "value", "job_id")}
                               for e in evaluations]}
    return summary, f"```mermaid\n{graph}\n```", details


# What a checkpoint of each relation usually needs next ("Use as input of" preselects it).
NEXT_STEP = {
    "scale": ("continue_pretrain", "Grown or cut layers need training: continue pre-training "
                                   "on domain text (after a block expansion, set "
                                   "`trainable_layers: new` to train only the new blocks, as "
                                   "LLaMA Pro does)."),
    "prune": ("train", "Fine-tuning can recover what pruning cost."),
    "adapter": ("merge_adapter", "Fold it into its base for a full checkpoint that any "
                                 "plugin can read (or merge it with other models)."),
    "task_vector": ("task_vector", "A task vector is not a model: set `action: apply` (or "
                                   "learn, graft), put its id in `vectors` and choose a "
                                   "`target`."),
}


def suggested_next(lab: Lab, ck_id: str | None) -> tuple[str | None, str]:
    """(plugin to preselect in "Use as input of", a one-line hint) for a checkpoint."""
    if not ck_id:
        return None, ""
    with lab.registry() as reg:
        row = reg.find_checkpoint(ck_id)
    found = plugins.discover()
    relation = row["relation"] if row else None
    plugin, hint = NEXT_STEP.get(relation, ("evaluate", ""))
    if plugin not in found:
        plugin, hint = ("evaluate", "") if "evaluate" in found else (None, "")
    return plugin, hint


PER_LAYER_SERIES = ("block_influence", "sparsity_per_layer", "norm_per_layer",
                    "skill_per_layer")  # metadata lists drawn per layer in the Registry


def per_layer_frame(lab: Lab, ck_id: str | None):
    """Per-layer series a plugin recorded on a checkpoint (e.g. block influence), long form."""
    import pandas as pd

    rows = []
    if ck_id:
        with lab.registry() as reg:
            row = reg.find_checkpoint(ck_id)
        meta = (to_json(row).get("metadata") or {}) if row else {}
        for key in PER_LAYER_SERIES:
            values = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(values, list):
                # zero-padded labels: a categorical axis (wide bars) that still sorts in order
                rows += [{"layer": f"{i:02d}", "value": v, "series": key}
                         for i, v in enumerate(values)]
    return pd.DataFrame(rows or {"layer": [], "value": [], "series": []})


def compare(lab: Lab, ck_ids: list[str] | None) -> tuple[object, object]:
    """Scores of two or more checkpoints side by side, with each one's delta against its
    parents: (table DataFrame, long-form DataFrame for the bar chart)."""
    import pandas as pd

    ck_ids = [c for c in (ck_ids or []) if c]
    table = pd.DataFrame({"metric": []})
    bars = pd.DataFrame({"bar": [], "value": [], "checkpoint": []})
    if not ck_ids:
        return table, bars
    with lab.registry() as reg:
        rows = [reg.checkpoint(c) for c in ck_ids]
        scores = reg.latest_scores([r["id"] for r in rows])
        deltas = {r["id"]: reg.score_deltas(r["id"]) for r in rows}
    metrics = sorted({m for r in rows for m in scores.get(r["id"], {})})
    data: dict[str, list] = {"metric": metrics}
    long = []
    for r in rows:
        label = f"{r['name']} ({r['id']})"
        values = scores.get(r["id"], {})
        data[label] = [f"{values[m]:.6g}" if m in values else "" for m in metrics]
        data[f"{r['name']} vs parents"] = [
            ", ".join(f"{d['delta']:+.4g} vs {d['parent_name']}" for d in deltas[r["id"]]
                      if d["metric"] == m) for m in metrics]
        # one bar per (metric, checkpoint): bars of one metric stand side by side, not stacked
        long += [{"bar": f"{m} · {r['name']}", "value": v, "checkpoint": r["name"]}
                 for m, v in sorted(values.items())]
    return pd.DataFrame(data), pd.DataFrame(long) if long else bars


def lineage_chain(lab: Lab, ck_id: str | None, from_id: str | None = None,
                  metrics: list[str] | None = None) -> tuple[object, list[str], str]:
    """Scores along a lineage path (e.g. base -> continue_pretrain -> train -> merge), to see
    what each step gained and what it forgot: (long-form DataFrame step/value/metric for a
    line plot, every metric scored somewhere on the path, the path as markdown)."""
    import pandas as pd

    empty = pd.DataFrame({"step": [], "value": [], "metric": []})
    if not ck_id:
        return empty, [], "Pick a checkpoint (and optionally an ancestor to start from)."
    try:
        with lab.registry() as reg:
            path = reg.chain(ck_id, from_id or None)
            scores = reg.latest_scores([r["id"] for r in path])
    except RegistryError as e:
        return empty, [], f"**{markup.md(e)}**"
    available = sorted({m for r in path for m in scores.get(r["id"], {})})
    chosen = [m for m in (metrics or []) if m in available] or available[:4]
    rows = []
    for i, r in enumerate(path):
        # zero-padded labels: an ordered categorical axis that names each step
        label = f"{i:02d} {r['name']}"
        rows += [{"step": label, "value": scores[r["id"]][m], "metric": m}
                 for m in chosen if m in scores.get(r["id"], {})]
    text = " → ".join(f"{markup.md(r['name'])} ({markup.md(r['relation'])})" for r in path)
    return (pd.DataFrame(rows) if rows else empty), available, text


def import_form(lab: Lab, ref: str, name: str, user: str | None = None) -> str:
    if not (ref or "").strip():
        return "**Give a local folder or a Hub id (ORG/NAME).**"
    from app.paths import import_problem

    refused = import_problem(lab, ref)
    if refused:
        return f"**Not imported:** {markup.md(refused)}"
    try:
        with lab.registry() as reg:
            row = import_checkpoint(lab, reg, ref.strip(), name=(name or "").strip() or None,
                                    user=user)
    except (CheckpointError, RefError, RegistryError) as e:
        return f"**Not imported:** {markup.md(e)}"
    return f"Registered **{markup.md(row['name'])}** as {markup.md(row['id'])}."


def publish_to_hub(lab: Lab, ck_id: str | None, repo: str, private: bool = False,
                   omit_local_parents: bool = False, user: str | None = None) -> str:
    """The "Publish to Hub" button: one commit with the checkpoint's files and model card,
    with the logged-in user's own token when they saved one (see hub.load_token)."""
    from app.auth import audit
    from registry import hub

    if not ck_id:
        return "Select a checkpoint first."
    if not (repo or "").strip():
        return "**Give a Hub repo (ORG/NAME).**"
    warnings: list[str] = []
    try:
        with lab.registry() as reg:
            from app.lab import hub_repo

            result = hub.push_checkpoint(reg, ck_id, hub_repo(lab.settings, repo),
                                         private=bool(private),
                                         omit_local_parents=bool(omit_local_parents),
                                         token=hub.load_token(user), log=warnings.append)
            audit(reg, user, "checkpoint.publish", result.get("checkpoint", ck_id),
                  {"repo": result["repo"], "commit": result["commit"]})
    except (hub.HubError, RegistryError) as e:
        return f"**Not published:** {markup.md(e)}"
    link = f"[{markup.md(result['repo'])}](<{markup.html(result['url'])}>)"
    done = (f"Published to {link} at commit {markup.md(result['commit'][:12])}."
            if result["new_commit"] else f"Unchanged on {link}: no new commit.")
    return "\n\n".join([done] + [f"_{markup.md(w)}_" for w in warnings])


def save_hub_token(lab: Lab, token: str, user: str | None = None) -> str:
    """Store the Hub token (mode 0600, never in the lab): the logged-in lab user's own file,
    or without users the token file of the account the server runs as."""
    from registry import hub

    try:
        path = hub.save_token(token, lab_root=lab.root, user=user)
    except hub.HubError as e:
        return f"**Not saved:** {markup.md(e)}"
    return f"Token saved to {markup.md(path)} (mode 0600)."


def sync_registry_form(lab: Lab, repo: str, user: str | None = None) -> str:
    from registry import hub

    repo = (repo or "").strip() or lab.settings.hub_sync_repo
    if not repo:
        return "**Give the registry's Hub dataset repo (ORG/NAME).**"
    try:
        with lab.registry() as reg:
            result = hub.sync_registry(reg, repo, token=hub.load_token(user),
                                       log=lambda m: None)
    except (hub.HubError, RegistryError) as e:
        return f"**Not synced:** {markup.md(e)}"
    added = ", ".join(f"{n} {t}" for t, n in result["added"].items() if n) or "nothing"
    pushed = ", ".join(f"{n} {t}" for t, n in result["pushed"].items() if n) or "nothing"
    return f"Synced with {markup.md(repo)}: pulled {added}; pushed {pushed}."


# ---------------------------------------------------------------------------------- layout
CSS = """
.ws-progress { height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; }
.ws-progress > div { height: 100%; background: #f97316; transition: width .3s; }
"""


def _widget(gr, spec: forms.FieldSpec, value, choices):
    label = spec.label + (" *" if spec.required else "")
    info = spec.help or None
    if spec.kind == forms.CHECKBOX:
        return gr.Checkbox(value=value, label=label, info=info)
    if spec.kind == forms.SLIDER:
        step = 1 if spec.integer else (spec.maximum - spec.minimum) / 100
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=step, value=value,
                         label=label, info=info)
    if spec.kind == forms.NUMBER and spec.optional:
        # gr.Number cannot be empty (it sends 0), so an optional number is a text box
        return gr.Textbox(value=value, label=label, info=info,
                          placeholder="empty: " + (str(spec.default) if spec.default is not None
                                                   else "the default"))
    if spec.kind == forms.NUMBER:
        return gr.Number(value=value, label=label, info=info, precision=0 if spec.integer
                         else None)
    if spec.kind == forms.DROPDOWN:
        return gr.Dropdown(choices=spec.choices, value=value, label=label, info=info)
    if spec.kind in (forms.CHECKPOINT, forms.CHECKPOINTS):
        return gr.Dropdown(choices=choices, value=value, label=label, info=info,
                           allow_custom_value=True, multiselect=spec.kind == forms.CHECKPOINTS,
                           filterable=True)
    if spec.kind == forms.FILE:
        return gr.Textbox(value=value, label=label, scale=4,
                          info=(info or "") + " (a path on the server, or upload a file)")
    if spec.kind == forms.YAML:
        return gr.Textbox(value=value, label=label, info=(info or "") + " (YAML)")
    return gr.Textbox(value=value, label=label, info=info,
                      lines=10 if spec.multiline else 1, max_lines=40 if spec.multiline else 1)


# What an upload may be: data files that plugins read as data. Uploads are never code: no
# Python, pickles or shared objects, and code fields (lm-eval task folders) refuse uploads/.
UPLOAD_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".yaml", ".yml", ".parquet",
                   ".md")


class UploadError(ValueError):
    """An upload refused: too big, or not a data file."""


def save_upload(lab: Lab, temp_path: str | None) -> str:
    """Keep an uploaded file in the lab (uploads/, mode 0600), so jobs read it from there;
    returns its path for the form's path box. Only data files are kept."""
    if not temp_path:
        return ""
    import re
    import shutil
    import uuid

    size = Path(temp_path).stat().st_size
    if size > lab.settings.max_upload_mb * 2 ** 20:  # the web server refuses them first
        raise UploadError(f"upload of {size / 2 ** 20:.0f} MiB refused: this lab accepts files "
                          f"up to {lab.settings.max_upload_mb} MiB (max_upload_mb in lab.toml)")
    name = Path(temp_path).name
    if not name.lower().endswith(UPLOAD_SUFFIXES):
        raise UploadError(f"upload {name!r} refused: expected a data file "
                          f"({', '.join(UPLOAD_SUFFIXES)})")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:].lstrip(".") or "upload"
    uploads = lab.root / "uploads"
    uploads.mkdir(exist_ok=True)
    target = uploads / f"{uuid.uuid4().hex[:8]}-{safe}"
    shutil.copyfile(temp_path, target)
    target.chmod(0o600)
    return str(target)


def upload_to_box(lab: Lab, temp_path: str | None):
    """The Upload button: the kept file's path, or the box unchanged and a warning toast."""
    import gradio as gr

    try:
        return save_upload(lab, temp_path)
    except UploadError as e:
        gr.Warning(str(e))
        return gr.skip()


def _build_widgets(gr, lab, specs, values, choices, out):
    for spec in specs:
        if spec.kind == forms.GROUP:
            with gr.Accordion(spec.label, open=False):
                if spec.help:
                    gr.Markdown(spec.help)
                _build_widgets(gr, lab, spec.children, values, choices, out)
        elif spec.kind == forms.FILE:
            with gr.Row(equal_height=True):
                box = _widget(gr, spec, values[len(out)], choices)
                upload = gr.UploadButton("Upload", type="filepath", size="sm", scale=0)
                upload.upload(lambda f: upload_to_box(lab, f), inputs=upload, outputs=box,
                              api_visibility="private")
            out.append((spec, box))
        else:
            out.append((spec, _widget(gr, spec, values[len(out)], choices)))


def build_app(lab: Lab):
    import functools

    import gradio as gr

    # Markdown that shows lab members' text: no $...$ math either (KaTeX would style a name)
    text_md = functools.partial(gr.Markdown, latex_delimiters=[])
    found = plugins.discover()
    choices = checkpoint_choices(lab)
    checkpoint_widgets = []  # every checkpoint dropdown, refreshed as the registry changes
    first_checkpoint = {}  # plugin name -> its first checkpoint dropdown ("Use as input")

    def fill_form(loaded, n_inputs):
        values, note = loaded
        return (*(values if values is not None else [gr.skip()] * n_inputs), note)

    def live_job(job_id, chosen=None):
        status, bar, log, frame = job_detail(lab, job_id)
        names = sorted(set(frame["name"])) if len(frame) else []
        shown = plotted_metrics(names, chosen)
        frame = frame[frame["name"].isin(shown)] if len(frame) else frame
        return (status, bar, log, gr.LinePlot(value=frame, visible=len(frame) > 0),
                gr.Dropdown(choices=names, visible=bool(names)))

    def show_per_layer(ck_id):
        frame = per_layer_frame(lab, ck_id)
        return gr.BarPlot(value=frame, visible=len(frame) > 0)

    def first_cell(evt: gr.SelectData) -> str:
        return str(evt.row_value[0]) if evt.row_value else ""

    def use_as_input(plugin_name, ck_id):
        if not plugin_name or not ck_id:
            return gr.skip(), *[gr.skip() for _ in first_checkpoint]
        return (gr.Tabs(selected=f"plugin-{plugin_name}"),
                *[ck_id if name == plugin_name else gr.skip() for name in first_checkpoint])

    with gr.Blocks(title="Weightsmith") as app:
        text_md(f"# Weightsmith\nLab `{lab.root}`")
        with gr.Tabs() as tabs:
            for plugin in found.values():
                with gr.Tab(plugin.title, id=f"plugin-{plugin.name}"):
                    text_md(plugin.description)
                    specs = forms.form_spec(plugin.Config)
                    widgets: list = []
                    _build_widgets(gr, lab, specs, forms.config_to_values(specs, {}),
                                   choices, widgets)
                    inputs = [w for _, w in widgets]
                    checkpoint_widgets += [w for s, w in widgets
                                           if s.kind in (forms.CHECKPOINT, forms.CHECKPOINTS)]
                    for s, w in widgets:
                        if s.kind == forms.CHECKPOINT:
                            first_checkpoint[plugin.name] = w
                            break
                    with gr.Row():
                        run = gr.Button("Run", variant="primary")
                        show = gr.Button("Show YAML / CLI")
                        peek = gr.Button("Preview data", visible=plugin.preview is not None)
                        upload = gr.File(label="Load YAML", file_types=[".yaml", ".yml"],
                                         type="filepath", height=80)
                    message = text_md(elem_id=f"message-{plugin.name}")
                    job_id = gr.Textbox(visible=False)
                    code = gr.Code(language="yaml", label="What will be submitted")
                    name = plugin.name
                    def on_run(request: gr.Request, *v, name=name):
                        return submit_form(lab, name, v, user=request_user(request))

                    run.click(on_run,
                              inputs=inputs, outputs=[message, job_id], api_name=f"run_{name}")
                    show.click(lambda *v, name=name: preview(name, v), inputs=inputs,
                               outputs=code, api_name=f"preview_{name}")
                    if plugin.preview is not None:
                        peek.click(lambda *v, name=name: preview_data(lab, name, v),
                                   inputs=inputs, outputs=message,
                                   api_name=f"preview_data_{name}")
                    upload.upload(lambda p, name=name, n=len(inputs): fill_form(
                                      load_yaml(name, p), n),
                                  inputs=upload, outputs=inputs + [message],
                                  api_visibility="private")

            with gr.Tab("Jobs", id="jobs"):
                gpus_md = text_md(gpu_summary, elem_id="gpus")
                jobs_df = gr.Dataframe(headers=JOB_COLUMNS, value=lambda: job_table(lab),
                                       interactive=False, label="Jobs")
                with gr.Row():
                    selected_job = gr.Textbox(label="Selected job", scale=3)
                    stop = gr.Button("Stop", variant="stop", scale=1)
                    retry = gr.Button("Retry", scale=1)
                    resume = gr.Button("Resume", scale=1)
                job_status = text_md(elem_id="job-status")
                progress = gr.HTML(elem_id="job-progress")
                with gr.Row():
                    log = gr.Textbox(label="Log (live tail)", lines=16, max_lines=16,
                                     autoscroll=True, scale=3, elem_id="job-log")
                    with gr.Column(scale=2):
                        plot_metrics = gr.Dropdown(  # custom values: see bound_sessions
                            choices=[], multiselect=True, label="Plot", visible=False,
                            allow_custom_value=True,
                            info="Curves to draw (empty: the losses and perplexities).")
                        plot = gr.LinePlot(x="step", y="value", color="name",
                                           label="Metrics", visible=False)
                action = text_md(elem_id="job-action")
                jobs_df.select(first_cell, outputs=selected_job,
                               api_visibility="private")
                selected_job.change(lambda j: live_job(j)[:4], inputs=selected_job,
                                    outputs=[job_status, progress, log, plot],
                                    api_name="job_detail")
                plot_metrics.change(lambda j, c: live_job(j, c)[3],
                                    inputs=[selected_job, plot_metrics], outputs=plot,
                                    api_visibility="private")
                def on_stop(request: gr.Request, j):
                    return stop_job(lab, j, request_user(request))

                stop.click(on_stop, inputs=selected_job, outputs=action, api_name="stop_job")
                def on_retry(request: gr.Request, j):
                    return retry_job(lab, j, request_user(request))

                def on_resume(request: gr.Request, j):
                    return resume_job(lab, j, request_user(request))

                retry.click(on_retry, inputs=selected_job,
                            outputs=[action, selected_job], api_name="retry_job")
                resume.click(on_resume, inputs=selected_job,
                             outputs=[action, selected_job], api_name="resume_job")

            with gr.Tab("Registry", id="registry") as registry_tab:
                with gr.Row():
                    search = gr.Textbox(label="Search name or id", scale=3)
                    refresh = gr.Button("Refresh", scale=1)
                ck_df = gr.Dataframe(headers=CK_COLUMNS, value=lambda: checkpoint_table(lab),
                                     interactive=False, label="Checkpoints")
                selected_ck = gr.Textbox(label="Selected checkpoint")
                ck_summary = text_md()
                with gr.Row():
                    use_plugin = gr.Dropdown(
                        choices=[(found[n].title, n) for n in first_checkpoint],
                        label="Use as input of", scale=2)
                    use = gr.Button("Use as input", scale=1)
                next_hint = text_md(elem_id="next-step")
                lineage = text_md(label="Lineage", elem_id="lineage")
                per_layer = gr.BarPlot(x="layer", y="value", color="series",
                                       label="Per layer", visible=False)
                ck_json = gr.JSON(label="Config, versions, files, evaluations")
                with gr.Accordion("Import checkpoint", open=False):
                    imp_ref = gr.Textbox(label="Local folder or Hub id (ORG/NAME)")
                    imp_name = gr.Textbox(label="Name (optional)")
                    imp_go = gr.Button("Import")
                    imp_msg = text_md()
                with gr.Accordion("Delete checkpoint", open=False):
                    text_md("A soft delete: the checkpoint leaves the lists; its row, "
                                "edges and scores stay so its descendants' lineage is whole. "
                                "Only its creator or an admin may delete it.")
                    del_go = gr.Button("Delete the selected checkpoint", variant="stop")
                    del_msg = text_md()
                with gr.Accordion("Publish to Hub", open=False):
                    pub_repo = gr.Textbox(label="Hub repo (ORG/NAME)")
                    with gr.Row():
                        pub_private = gr.Checkbox(label="Private repo")
                        pub_omit = gr.Checkbox(label="Leave parents that are not on the Hub "
                                                     "out of base_model")
                    pub_go = gr.Button("Publish to Hub")
                    pub_msg = text_md(elem_id="publish-message")
                with gr.Accordion("Hub settings", open=False):
                    hub_token = gr.Textbox(
                        label="Hub token", type="password",
                        info="Kept in your own token file (mode 0600), never in the lab, and "
                             "used when you publish or sync. Without one, the server's "
                             "HF_TOKEN or token file is used.")
                    token_go = gr.Button("Save token")
                    sync_repo = gr.Textbox(label="Registry dataset repo (ORG/NAME)",
                                           value=lab.settings.hub_sync_repo)
                    sync_go = gr.Button("Sync registry")
                    hub_msg = text_md()
                search.submit(lambda s: checkpoint_table(lab, s), inputs=search, outputs=ck_df,
                              api_visibility="private")
                refresh.click(lambda s: checkpoint_table(lab, s), inputs=search, outputs=ck_df,
                              api_name="checkpoints")
                ck_df.select(first_cell, outputs=selected_ck, api_visibility="private")
                registry_tab.select(lambda s: checkpoint_table(lab, s), inputs=search,
                                    outputs=ck_df, api_visibility="private")
                selected_ck.change(lambda c: checkpoint_detail(lab, c), inputs=selected_ck,
                                   outputs=[ck_summary, lineage, ck_json],
                                   api_name="checkpoint_detail")
                selected_ck.change(lambda c: (lambda p, h: (gr.Dropdown(value=p), h))(
                                       *suggested_next(lab, c)), inputs=selected_ck,
                                   outputs=[use_plugin, next_hint], api_name="next_step")
                selected_ck.change(lambda c: show_per_layer(c), inputs=selected_ck,
                                   outputs=per_layer, api_visibility="private")
                def on_import(request: gr.Request, r, n):
                    return import_form(lab, r, n, user=request_user(request))

                imp_go.click(on_import, inputs=[imp_ref, imp_name],
                             outputs=imp_msg, api_name="import_checkpoint")

                def on_delete(request: gr.Request, c):
                    return delete_checkpoint_form(lab, c, request_user(request))

                del_go.click(on_delete, inputs=selected_ck, outputs=del_msg,
                             api_name="delete_checkpoint")
                def on_publish(request: gr.Request, c, r, p, o):
                    return publish_to_hub(lab, c, r, p, o, user=request_user(request))

                def on_token(request: gr.Request, t):
                    return save_hub_token(lab, t, user=request_user(request)), ""

                def on_sync(request: gr.Request, r):
                    return sync_registry_form(lab, r, user=request_user(request))

                pub_go.click(on_publish, inputs=[selected_ck, pub_repo, pub_private, pub_omit],
                             outputs=pub_msg, api_name="publish_to_hub")
                token_go.click(on_token, inputs=hub_token, outputs=[hub_msg, hub_token],
                               api_visibility="private")
                sync_go.click(on_sync, inputs=sync_repo, outputs=hub_msg,
                              api_name="sync_registry")

            with gr.Tab("Compare", id="compare"):
                picks = gr.Dropdown(choices=choices, multiselect=True, filterable=True,
                                    label="Checkpoints to compare (two or more)")
                compare_go = gr.Button("Compare", variant="primary")
                compare_table = gr.Dataframe(label="Scores, and the change against each "
                                             "checkpoint's parents", interactive=False)
                compare_plot = gr.BarPlot(x="bar", y="value", color="checkpoint",
                                          label="Scores", x_label_angle=-30)
                compare_go.click(lambda c: compare(lab, c), inputs=picks,
                                 outputs=[compare_table, compare_plot], api_name="compare")
                checkpoint_widgets.append(picks)
                text_md("### Scores along a lineage chain\nWhat each step gained, and "
                            "what it forgot, from an ancestor down to a checkpoint.")
                with gr.Row():
                    chain_to = gr.Dropdown(choices=choices, filterable=True,
                                           label="Checkpoint (end of the chain)")
                    chain_from = gr.Dropdown(choices=choices, filterable=True,
                                             label="Ancestor to start from (empty: follow "
                                                   "first parents to the root)")
                    chain_metrics = gr.Dropdown(choices=[], multiselect=True,
                                                allow_custom_value=True,
                                                label="Metrics (empty: the first four)")
                chain_go = gr.Button("Plot chain")
                chain_text = text_md()
                chain_plot = gr.LinePlot(x="step", y="value", color="metric",
                                         label="Scores along the chain", x_label_angle=-30)
                checkpoint_widgets += [chain_to, chain_from]

                def plot_chain(to, start, chosen):
                    frame, available, text = lineage_chain(lab, to, start, chosen)
                    return frame, gr.Dropdown(choices=available, value=[
                        m for m in (chosen or []) if m in available]), text

                chain_go.click(plot_chain, inputs=[chain_to, chain_from, chain_metrics],
                               outputs=[chain_plot, chain_metrics, chain_text],
                               api_name="lineage_chain")

        # Live updates: poll the registry (state lives there, not in this process).
        timer = gr.Timer(1.5)
        timer.tick(lambda j, c: (job_table(lab), *live_job(j, c)),
                   inputs=[selected_job, plot_metrics],
                   outputs=[jobs_df, job_status, progress, log, plot, plot_metrics],
                   api_visibility="private", show_progress="hidden")

        def refresh_registry(search_text):
            fresh = checkpoint_choices(lab)
            return (checkpoint_table(lab, search_text),
                    *[gr.Dropdown(choices=fresh) for _ in checkpoint_widgets])

        slow = gr.Timer(5.0)
        slow.tick(refresh_registry, inputs=search, outputs=[ck_df] + checkpoint_widgets,
                  api_visibility="private", show_progress="hidden")
        slow.tick(gpu_summary, outputs=gpus_md, api_visibility="private",
                  show_progress="hidden")
        # each page load gets the registry as it is now, not as it was at server start
        app.load(refresh_registry, inputs=search, outputs=[ck_df] + checkpoint_widgets,
                 api_visibility="private", show_progress="hidden")
        bound_sessions(app)  # per-page server memory is capped (see there)

        # "Use as input": open the plugin's tab with the checkpoint in its first checkpoint
        # field.
        use.click(use_as_input, inputs=[use_plugin, selected_ck],
                  outputs=[tabs] + list(first_checkpoint.values()), api_visibility="private")
    return app


# ------------------------------------------------------------------ per-page server memory
# Gradio keeps a SessionState per page (session_hash) from its first event on: a copy of every
# component's config (~0.75 MiB for this app's ~350 components) plus what handlers returned.
# By default it drops one only past 10,000 pages, closed pages included, so a long-running
# server grew ~0.95 MiB per page load (bench/load.py --connections). The app keeps no state
# of its own per page (it all lives in the registry), so Gradio holds at most
# SESSION_CAPACITY, the least recently active out first: an open page's timer touches its
# session every 1.5 s, so closed pages and idle API clients go first. An evicted page still
# works; its next event starts from the initial config (a dropdown whose choices a handler
# set then checks values against its initial choices, unless it allows custom values).
# Not freed on disconnect (an unload listener): that makes every page hold Gradio's heartbeat
# stream open, and a uvicorn shutdown (asgi_app) then waits for every open tab.
# Gradio's queue also keeps its last GRADIO_ANALYTICS_MAX_EVENTS events (default 10,000, about
# 1,400 page loads) and rebuilds a pandas frame of them after every event: another ~60 MiB
# over 1,000 page loads, and CPU per event; the app keeps 1,000 unless the environment says.
SESSION_CAPACITY = 64
ANALYTICS_EVENTS = 1000


def bound_sessions(app) -> None:
    """Cap the per-page sessions `app` (a gr.Blocks, before `.queue()`) keeps, and Gradio's
    event records. `launch()` must get `state_session_capacity=app.state_session_capacity`
    (it overwrites the attribute); gr.mount_gradio_app reads the attribute."""
    import os

    app.state_session_capacity = SESSION_CAPACITY
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", str(ANALYTICS_EVENTS))  # for .queue()
