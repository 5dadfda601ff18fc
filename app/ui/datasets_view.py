"""The Datasets tab: the data the lab's jobs read, recorded by content hash (app/datasets.py):
uploads, files on the server and Hub dataset ids, with their format, rows and size; the
selected one's preview, the checkpoints it trained or calibrated and the jobs that read it;
an Upload that records a new one; and "Use in", which puts its id into a form's data field.
"""

from dataclasses import dataclass

from app import datasets
from app.lab import Lab
from app.ui.navigation import job_link, link
from app.ui.shared import (UPLOAD_SUFFIXES, UploadError, copy_first_cell, keep_upload,
                           request_user, text_md)
from plugins.kit import markup

DS_COLUMNS = ["id", "name", "format", "rows", "size", "checkpoints", "jobs", "created by",
              "created"]


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def dataset_table(lab: Lab, search: str = "") -> list[list]:
    rows = datasets.dataset_rows(lab, (search or "").strip() or None)
    return [[r["id"], r["name"], r["format"] or "", "" if r["rows"] is None else r["rows"],
             _size(r["size_bytes"]), r["checkpoints"], r["jobs"], r["created_by"] or "",
             r["created_at"][:19].replace("T", " ")] for r in rows]


def dataset_detail(lab: Lab, ds_id: str | None) -> tuple[str, dict]:
    """(summary markdown, preview table value) of a dataset."""
    empty = {"headers": ["text"], "data": []}
    ds_id = (ds_id or "").strip()
    if not ds_id:
        return "Select a dataset in the table, or upload one.", empty
    try:
        found = datasets.describe(lab, ds_id)
    except datasets.DatasetError as e:
        return markup.md(e), empty
    md, row, uses = markup.md, found["row"], found["uses"]
    if row["path"]:
        where = row["path"]
    elif row["source"].startswith("hf://"):
        where = row["source"].removeprefix("hf://") + " (a Hub dataset: the lab holds no " \
            "copy, so it is recorded by id)"
    else:
        where = "no file recorded"
    summary = (f"### {md(row['name'])}  ({md(row['id'])})\n"
               f"{md(row['format'] or '')}"
               + (f" · {row['rows']} rows" if row["rows"] is not None else "")
               + (f" · {row['files']} files" if (row["files"] or 0) > 1 else "")
               + (f" · {_size(row['size_bytes'])}" if row["size_bytes"] is not None else "")
               + f" · {md(row['source'])} · created {row['created_at'][:19].replace('T', ' ')}"
               f" by {md(row['created_by'] or '-')}\n\n"
               f"Where: {md(where)}"
               + (f"\n\nSHA-256: `{row['content_hash']}`" if row["path"] else "")
               + f"\n\nIn a form's data field, this dataset is `{row['id']}`.")
    if row.get("job_id"):  # written by a job (a selection): which, and from what
        summary += f"\n\n**Made by** {job_link(row['job_id'])}" + (" from " + ", ".join(
            f"{link(md(s['name']), tab='datasets', ds=s['id'])} ({md(s['field'])})"
            for s in uses["sources"]) if uses["sources"] else "")
    if uses["checkpoints"]:
        summary += "\n\n**Trained or calibrated**: " + ", ".join(
            f"{link(md(c['name']), tab='registry', ck=c['id'])} ({md(c['field'])})"
            for c in uses["checkpoints"])
    if uses["jobs"]:
        summary += "\n\n**Read by jobs**: " + ", ".join(
            f"{job_link(j['id'])} ({md(j['plugin'])}, {md(j['field'])}, {md(j['status'])})"
            for j in uses["jobs"])
    if not uses["jobs"]:
        summary += "\n\nNo job has read it yet."
    if found["problem"]:
        summary += f"\n\n**No preview:** {md(found['problem'])}"
    preview = {"headers": found["columns"] or ["text"], "data": found["rows"]}
    return summary, preview


def upload_dataset(lab: Lab, temp_path: str | None, user: str | None) -> tuple[str, str]:
    """Keep an uploaded file as a dataset: (message, its id for the selected box)."""
    try:
        kept = keep_upload(lab, temp_path, user)
    except UploadError as e:
        return markup.md(e), ""
    if kept is None:
        return "", ""
    row = kept[1]
    rows = f", {row['rows']} rows" if row["rows"] is not None else ""
    return (f"Recorded {markup.md(row['name'])} ({row['id']}{rows}). Use it in a form's data "
            f"field: pick it under *or a registered dataset*, or type `{row['id']}`."), row["id"]


def use_targets(data_widgets: dict, titles: dict) -> list[tuple[str, str]]:
    """("Train · data", "train:data") for every form's data field."""
    return [(f"{titles[plugin]} · {path}", f"{plugin}:{path}") for plugin, path in data_widgets]


@dataclass
class DatasetsView:
    selected: object
    table: object
    search: object


def build(lab: Lab, tabs, data_widgets: dict, titles: dict) -> DatasetsView:
    """The Datasets tab (inside the app's gr.Tabs `tabs`); "Use in" puts the selected id into
    one of `data_widgets` ((plugin name, field path) -> widget) and opens that plugin's tab."""
    import gradio as gr

    keys = list(data_widgets)
    with gr.Tab("Datasets", id="datasets") as tab:
        text_md("The data this lab's jobs read, each recorded by content hash: an upload, a "
                "file or folder on the server, or a Hub dataset id. The lineage graphs draw "
                "a dataset as a cylinder, with a dashed edge to each checkpoint it trained or "
                "calibrated.")
        with gr.Row(equal_height=True):
            search = gr.Textbox(label="Search name or id", scale=3, elem_id="dataset-search")
            upload = gr.UploadButton("Upload a dataset", type="filepath", scale=1,
                                     file_types=list(UPLOAD_SUFFIXES),
                                     elem_id="dataset-upload")
        message = text_md(elem_id="dataset-message")
        table = gr.Dataframe(headers=DS_COLUMNS, value=dataset_table(lab),
                             interactive=False, label="Datasets", elem_id="dataset-table")
        # lineage.js and url_state.js set this box (a dataset node clicked; ?ds= in the URL)
        selected = gr.Textbox(label="Selected dataset", elem_id="selected-dataset")
        summary = text_md(elem_id="dataset-summary")
        with gr.Row(equal_height=True):
            target = gr.Dropdown(choices=use_targets(data_widgets, titles), value=None,
                                 label="Use in", scale=3, elem_id="dataset-use-target")
            use = gr.Button("Use", scale=1, elem_id="dataset-use")
        preview = gr.Dataframe(label="First rows", interactive=False, wrap=True,
                               elem_id="dataset-preview")

    def on_upload(request: gr.Request, f, s):
        text, ds_id = upload_dataset(lab, f, request_user(request))
        return text, dataset_table(lab, s), ds_id if ds_id else gr.skip()

    def on_use(where, ds_id):
        ds_id = (ds_id or "").strip()
        if not where or not ds_id or where.split(":", 1)[0] not in titles:
            return [gr.skip()] + [gr.skip()] * len(keys) + [
                "Select a dataset and a form field to use it in."]
        plugin, path = where.split(":", 1)
        return [gr.Tabs(selected=f"plugin-{plugin}")] + [
            ds_id if key == (plugin, path) else gr.skip() for key in keys] + [""]

    search.submit(lambda s: dataset_table(lab, s), inputs=search, outputs=table,
                  api_visibility="private")
    tab.select(lambda s: dataset_table(lab, s), inputs=search, outputs=table,
               api_visibility="private", show_progress="hidden")
    upload.upload(on_upload, inputs=[upload, search], outputs=[message, table, selected],
                  api_visibility="private")
    copy_first_cell(table, selected)
    selected.change(lambda d: dataset_detail(lab, d), inputs=selected,
                    outputs=[summary, preview], api_name="dataset_detail")
    use.click(on_use, inputs=[target, selected],
              outputs=[tabs] + [data_widgets[k] for k in keys] + [message],
              api_visibility="private")
    return DatasetsView(selected, table, search)
