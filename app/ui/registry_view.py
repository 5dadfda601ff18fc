"""The Registry tab: the checkpoints, the selected one's details and lineage graph (Mermaid),
its per-layer series, the suggested next step ("Use as input of"), and import, delete,
publish to the Hub and registry sync."""

from dataclasses import dataclass
from pathlib import Path

import plugins
from app import auth
from app.auth import NotAllowed
from app.checkpoints import import_checkpoint, to_json
from app.lab import Lab
from app.ui.shared import checkpoint_choices, copy_first_cell, request_user, text_md
from plugins.kit import markup
from registry import CheckpointError, RefError, RegistryError

CK_COLUMNS = ["id", "name", "relation", "parents", "params", "size", "scores", "job"]


# ---------------------------------------------------------------------------------- handlers
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


def suggested_next(lab: Lab, ck_id: str | None) -> tuple[str | None, str]:
    """(plugin to preselect in "Use as input of", a one-line hint) for a checkpoint: the
    `next_steps` a plugin declares for the checkpoint's relation, else evaluate."""
    if not ck_id:
        return None, ""
    with lab.registry() as reg:
        row = reg.find_checkpoint(ck_id)
    found = plugins.discover()
    relation = row["relation"] if row else None
    step = next((p.next_steps[relation] for p in found.values() if relation in p.next_steps),
                None)
    if step is not None and step.plugin in found:
        return step.plugin, step.hint
    return ("evaluate", "") if "evaluate" in found else (None, "")


def per_layer_series() -> list[str]:
    """Metadata keys drawn per layer in the Registry: every plugin's `per_layer_series`."""
    return list(dict.fromkeys(key for p in plugins.discover().values()
                              for key in p.per_layer_series))


def per_layer_frame(lab: Lab, ck_id: str | None):
    """Per-layer series a plugin recorded on a checkpoint (e.g. block influence), long form."""
    import pandas as pd

    rows = []
    if ck_id:
        with lab.registry() as reg:
            row = reg.find_checkpoint(ck_id)
        meta = (to_json(row).get("metadata") or {}) if row else {}
        for key in per_layer_series():
            values = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(values, list):
                # zero-padded labels: a categorical axis (wide bars) that still sorts in order
                rows += [{"layer": f"{i:02d}", "value": v, "series": key}
                         for i, v in enumerate(values)]
    return pd.DataFrame(rows or {"layer": [], "value": [], "series": []})


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



def next_step(lab: Lab, ck_id: str | None) -> tuple:
    """suggested_next as the view's updates: ("Use as input of" preselected, the hint)."""
    import gradio as gr

    plugin, hint = suggested_next(lab, ck_id)
    return gr.Dropdown(value=plugin), hint


def show_per_layer(lab: Lab, ck_id: str | None):
    """The "Per layer" bar plot of a checkpoint, hidden when it has no per-layer series."""
    import gradio as gr

    frame = per_layer_frame(lab, ck_id)
    return gr.BarPlot(value=frame, visible=len(frame) > 0)


def use_as_input(plugin_name: str | None, ck_id: str | None, plugin_names: list[str]) -> tuple:
    """"Use as input": open the plugin's tab with the checkpoint in its first checkpoint
    field; (the tabs, then one update per plugin in `plugin_names`)."""
    import gradio as gr

    if not plugin_name or not ck_id:
        return gr.skip(), *[gr.skip() for _ in plugin_names]
    return (gr.Tabs(selected=f"plugin-{plugin_name}"),
            *[ck_id if name == plugin_name else gr.skip() for name in plugin_names])


def registry_lists(lab: Lab, search_text: str, n_dropdowns: int) -> tuple:
    """The registry as it is now: the checkpoint table (filtered by `search_text`), then
    fresh choices for each of the app's `n_dropdowns` checkpoint dropdowns."""
    import gradio as gr

    fresh = checkpoint_choices(lab)
    return (checkpoint_table(lab, search_text),
            *[gr.Dropdown(choices=fresh) for _ in range(n_dropdowns)])


# ------------------------------------------------------------------------------------ layout
@dataclass
class RegistryView:
    """The Registry tab's components that the app refreshes as the registry changes."""

    search: object
    table: object


def build(lab: Lab, tabs, found: dict, first_checkpoint: dict) -> RegistryView:
    """The Registry tab (inside the app's gr.Tabs `tabs`) and its events; "Use as input"
    fills `first_checkpoint` (plugin name -> its first checkpoint dropdown) and opens that
    plugin's tab."""
    import gradio as gr

    with gr.Tab("Registry", id="registry") as registry_tab:
        with gr.Row():
            search = gr.Textbox(label="Search name or id", scale=3)
            refresh = gr.Button("Refresh", scale=1)
        table = gr.Dataframe(headers=CK_COLUMNS, value=lambda: checkpoint_table(lab),
                             interactive=False, label="Checkpoints")
        selected = gr.Textbox(label="Selected checkpoint")
        summary = text_md()
        with gr.Row():
            use_plugin = gr.Dropdown(choices=[(found[n].title, n) for n in first_checkpoint],
                                     label="Use as input of", scale=2)
            use = gr.Button("Use as input", scale=1)
        next_hint = text_md(elem_id="next-step")
        lineage = text_md(label="Lineage", elem_id="lineage")
        per_layer = gr.BarPlot(x="layer", y="value", color="series", label="Per layer",
                               visible=False)
        details = gr.JSON(label="Config, versions, files, evaluations")
        _checkpoint_actions(lab, selected)

    search.submit(lambda s: checkpoint_table(lab, s), inputs=search, outputs=table,
                  api_visibility="private")
    refresh.click(lambda s: checkpoint_table(lab, s), inputs=search, outputs=table,
                  api_name="checkpoints")
    copy_first_cell(table, selected)
    registry_tab.select(lambda s: checkpoint_table(lab, s), inputs=search, outputs=table,
                        api_visibility="private")
    selected.change(lambda c: checkpoint_detail(lab, c), inputs=selected,
                    outputs=[summary, lineage, details], api_name="checkpoint_detail")
    selected.change(lambda c: next_step(lab, c), inputs=selected,
                    outputs=[use_plugin, next_hint], api_name="next_step")
    selected.change(lambda c: show_per_layer(lab, c), inputs=selected, outputs=per_layer,
                    api_visibility="private")
    names = list(first_checkpoint)
    use.click(lambda p, c: use_as_input(p, c, names), inputs=[use_plugin, selected],
              outputs=[tabs] + [first_checkpoint[n] for n in names], api_name="use_as_input",
              api_visibility="private")
    return RegistryView(search, table)


def _checkpoint_actions(lab: Lab, selected) -> None:
    """The Registry's accordions and their events: import, delete (the `selected`
    checkpoint), publish it to the Hub, the Hub token and registry sync; each button acts as
    whoever clicks it."""
    import gradio as gr

    with gr.Accordion("Import checkpoint", open=False):
        imp_ref = gr.Textbox(label="Local folder or Hub id (ORG/NAME)")
        imp_name = gr.Textbox(label="Name (optional)")
        imp_go = gr.Button("Import")
        imp_msg = text_md()
    with gr.Accordion("Delete checkpoint", open=False):
        text_md("A soft delete: the checkpoint leaves the lists; its row, edges and scores "
                "stay so its descendants' lineage is whole. Only its creator or an admin may "
                "delete it.")
        del_go = gr.Button("Delete the selected checkpoint", variant="stop")
        del_msg = text_md()
    with gr.Accordion("Publish to Hub", open=False):
        pub_repo = gr.Textbox(label="Hub repo (ORG/NAME)")
        with gr.Row():
            pub_private = gr.Checkbox(label="Private repo")
            pub_omit = gr.Checkbox(label="Leave parents that are not on the Hub out of "
                                         "base_model")
        pub_go = gr.Button("Publish to Hub")
        pub_msg = text_md(elem_id="publish-message")
    with gr.Accordion("Hub settings", open=False):
        hub_token = gr.Textbox(
            label="Hub token", type="password",
            info="Kept in your own token file (mode 0600), never in the lab, and used when you "
                 "publish or sync. Without one, the server's HF_TOKEN or token file is used.")
        token_go = gr.Button("Save token")
        sync_repo = gr.Textbox(label="Registry dataset repo (ORG/NAME)",
                               value=lab.settings.hub_sync_repo)
        sync_go = gr.Button("Sync registry")
        hub_msg = text_md()

    def on_import(request: gr.Request, r, n):
        return import_form(lab, r, n, user=request_user(request))

    def on_delete(request: gr.Request, c):
        return delete_checkpoint_form(lab, c, request_user(request))

    def on_publish(request: gr.Request, c, r, p, o):
        return publish_to_hub(lab, c, r, p, o, user=request_user(request))

    def on_token(request: gr.Request, t):
        return save_hub_token(lab, t, user=request_user(request)), ""

    def on_sync(request: gr.Request, r):
        return sync_registry_form(lab, r, user=request_user(request))

    imp_go.click(on_import, inputs=[imp_ref, imp_name], outputs=imp_msg,
                 api_name="import_checkpoint")
    del_go.click(on_delete, inputs=selected, outputs=del_msg, api_name="delete_checkpoint")
    pub_go.click(on_publish, inputs=[selected, pub_repo, pub_private, pub_omit],
                 outputs=pub_msg, api_name="publish_to_hub")
    token_go.click(on_token, inputs=hub_token, outputs=[hub_msg, hub_token],
                   api_visibility="private")
    sync_go.click(on_sync, inputs=sync_repo, outputs=hub_msg, api_name="sync_registry")
