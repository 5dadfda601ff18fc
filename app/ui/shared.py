"""What several views of the workbench use: who clicked, Markdown for members' text, the
checkpoint choices, row selection, and keeping uploaded files. No gradio import at module
level (it is imported where a widget is made), so `import app.ui` stays cheap."""

from pathlib import Path

from app.lab import Lab


def request_user(request) -> str | None:
    """The logged-in user of a request (None in a lab without users)."""
    return getattr(request, "username", None) if request is not None else None


def text_md(*args, **kwargs):
    """A gr.Markdown for text that may hold lab members' words: no $...$ math either (KaTeX
    would style a name). The text itself still goes through plugins.kit.markup."""
    import gradio as gr

    return gr.Markdown(*args, latex_delimiters=[], **kwargs)


def checkpoint_choices(lab: Lab) -> list[tuple[str, str]]:
    """(label, id) of the registry's checkpoints, for every checkpoint dropdown."""
    with lab.registry() as reg:
        rows = reg.list_checkpoints(limit=500)
    return [(f"{r['name']} ({r['id']})", r["id"]) for r in rows]


def copy_first_cell(table, box) -> None:
    """Clicking a row of `table` puts its first cell (a job or checkpoint id) into `box`."""
    import gradio as gr

    def first_cell(evt: gr.SelectData) -> str:
        return str(evt.row_value[0]) if evt.row_value else ""

    table.select(first_cell, outputs=box, api_visibility="private")


class Ticks:
    """Handlers that share one event: each view `add`s (fn, inputs, outputs) and `wire`
    registers a single gr.Timer tick (or `wire_load` a single page-load event) that calls
    them all, so a page makes one round trip per tick, not one per view (with 20 pages open,
    each event costs the queue its own dispatch). A handler with one output returns its
    value; with several, a tuple.

    One load event instead of one per view also makes the page show sooner: Gradio's page
    walks its whole component tree for every event's loading status (pending, started,
    done), so eleven load events cost a ~1,000-component page about 0.9 s of the browser's
    time before Home showed (bench/startup.py)."""

    CONCURRENCY = 8  # ticks of different pages run side by side (read-only, mostly SQLite)

    def __init__(self):
        self.parts: list[tuple] = []

    def add(self, fn, inputs: list, outputs: list) -> None:
        self.parts.append((fn, list(inputs), list(outputs)))

    def _handler(self):
        import logging

        import gradio as gr

        def run(*values):
            out, at = [], 0
            for fn, ins, outs in self.parts:
                try:  # one view failing (a locked registry) leaves the others updating
                    got = fn(*values[at:at + len(ins)])
                except Exception:  # noqa: BLE001 -- logged; the view keeps what it shows
                    logging.getLogger(__name__).exception("a view's update failed")
                    got = gr.skip() if len(outs) == 1 else (gr.skip(),) * len(outs)
                at += len(ins)
                out.extend([got] if len(outs) == 1 else got)
            return tuple(out)

        inputs = [c for _, ins, _ in self.parts for c in ins]
        outputs = [c for _, _, outs in self.parts for c in outs]
        return run, inputs, outputs

    def wire(self, timer) -> None:
        run, inputs, outputs = self._handler()
        timer.tick(run, inputs=inputs, outputs=outputs, api_visibility="private",
                   show_progress="hidden", concurrency_limit=self.CONCURRENCY,
                   concurrency_id="ticks")

    def wire_load(self, app) -> None:
        """One page-load event of `app` (the gr.Blocks) for every part."""
        run, inputs, outputs = self._handler()
        app.load(run, inputs=inputs, outputs=outputs, api_visibility="private",
                 show_progress="hidden")


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


def keep_upload(lab: Lab, temp_path: str | None,
                user: str | None = None) -> tuple[str, dict] | None:
    """Keep an upload in the lab (`save_upload`) and record it as a dataset (by content
    hash, named after the uploaded file): (the kept file's path, its dataset row), or None
    for no file. Bytes the lab has seen before are that dataset, first path and all; the
    path returned is always the file just kept."""
    from app.datasets import DatasetError, register_path

    kept = save_upload(lab, temp_path)
    if not kept:
        return None
    try:
        return kept, register_path(lab, kept, user=user, source="upload",
                                   name=Path(temp_path).name)
    except DatasetError as e:
        Path(kept).unlink(missing_ok=True)
        raise UploadError(f"upload refused: {e}") from None


def upload_to_box(lab: Lab, temp_path: str | None, user: str | None = None):
    """The Upload button of a data field: the kept file's path (the file is recorded as a
    dataset), or the box unchanged and a warning toast."""
    import gradio as gr

    try:
        kept = keep_upload(lab, temp_path, user)
    except UploadError as e:
        gr.Warning(str(e))
        return gr.skip()
    return kept[0] if kept else ""


def dataset_choices(lab: Lab) -> list[tuple[str, str]]:
    """(label, id) of the lab's datasets, newest first, for the data fields' dropdowns."""
    from app.datasets import dataset_rows

    return [(f"{r['name']} ({r['id']}" + (f", {r['rows']} rows)" if r["rows"] is not None
                                          else ")"), r["id"]) for r in dataset_rows(lab)]
