"""The browser workbench (Gradio Blocks): one generated form per plugin, a live Jobs view and
the Registry with lineage graphs.

One module per view, each with a `build(...)` that makes its tab's components, wires their
events and returns what the other views need: `home_view`, `playground_view`, `forms_view`
(a tab per plugin), `jobs_view`, `registry_view` (checkpoints, lineage, Hub),
`compare_view`, `datasets_view`; `navigation` the bar and the URL state; `shared` holds
what several use (uploads, the shared timer `Ticks`). `build_app` assembles them. Every handler is a plain function over the lab, calling the
same functions as the CLI (`app.jobs.submit`, `app.jobs.cancel`, the registry), so a
refresh, a second tab or a server restart shows the same state: nothing lives in the
server's memory. No torch import here, and gradio only once an app is built.
"""

from pathlib import Path

import plugins
from app.lab import Lab
from app.ui import (compare_view, datasets_view, forms_view, home_view, jobs_view,
                    navigation, playground_view, registry_view)
# the handlers, importable from app.ui as before the views had modules of their own
from app.ui.compare_view import compare, lineage_chain
from app.ui.forms_view import load_yaml, preview, preview_data, submit_form
from app.ui.jobs_view import (JOB_COLUMNS, LOG_LINES, gpu_summary, job_detail, job_table,
                              job_table_view, plotted_metrics, resume_job, retry_job,
                              stop_job)
from app.ui.registry_view import (CK_COLUMNS, checkpoint_detail, checkpoint_table,
                                  delete_checkpoint_form, import_form, per_layer_frame,
                                  publish_to_hub, save_hub_token, suggested_next,
                                  sync_registry_form)
from app.ui.shared import (UPLOAD_SUFFIXES, Ticks, UploadError, checkpoint_choices,
                           dataset_choices, request_user, save_upload, text_md, upload_to_box)

__all__ = [
    "ANALYTICS_EVENTS", "CK_COLUMNS", "CSS", "HEAD", "JOB_COLUMNS", "LOG_LINES",
    "SESSION_CAPACITY", "UPLOAD_SUFFIXES", "UploadError", "bound_sessions", "build_app",
    "checkpoint_choices", "checkpoint_detail", "checkpoint_table", "compare",
    "dataset_choices", "delete_checkpoint_form",
    "gpu_summary", "import_form", "job_detail", "job_table", "lineage_chain", "load_yaml",
    "per_layer_frame", "plotted_metrics", "preview", "preview_data", "publish_to_hub",
    "request_user", "resume_job", "retry_job", "save_hub_token", "save_upload", "stop_job",
    "submit_form", "suggested_next", "sync_registry_form", "upload_to_box",
]

# The page's own CSS and scripts: every app/ui/static/*.css and *.js, one file per concern
# (the lineage graph's pan, zoom and clicks; the URL state), passed to launch / mount as css
# and head. Scripts there read no server data; they only move what the page shows.
_STATIC = Path(__file__).with_name("static")
CSS = """
.ws-progress { height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; }
.ws-progress > div { height: 100%; background: #f97316; transition: width .3s; }
""" + "".join(p.read_text() for p in sorted(_STATIC.glob("*.css")))
HEAD = "".join(f"<script>\n{p.read_text()}\n</script>\n" for p in sorted(_STATIC.glob("*.js")))


def build_app(lab: Lab):
    """The workbench for `lab`: Home, Playground, a tab per plugin, then Jobs, Registry,
    Compare and Datasets, under a navigation bar."""
    import gradio as gr

    found = plugins.discover()
    choices = checkpoint_choices(lab)
    operations = sorted(found.values(), key=lambda p: (p.order, p.title))
    # Gradio's cache (checkpoint zips, files handlers return) ages out after a day
    with gr.Blocks(title="Weightsmith", delete_cache=(3600, 86400)) as app:
        text_md("# Weightsmith")
        # tabs follow the work: Home, Playground, the operations (Plugin.order), Jobs,
        # Registry, Compare, Datasets; the bar wraps where Gradio's tab strip would fold
        nav = navigation.bar([("home", "Home"), ("playground", "Playground")]
                             + [(f"plugin-{p.name}", p.title) for p in operations]
                             + [("jobs", "Jobs"), ("registry", "Registry"),
                                ("compare", "Compare"), ("datasets", "Datasets")])
        with gr.Tabs(elem_id="ws-tabs") as tabs:
            home = home_view.build(lab)
            playground = playground_view.build(lab, choices)
            forms = forms_view.build(lab, found, choices)
            jobs = jobs_view.build(lab)
            registry = registry_view.build(lab, tabs, found, forms.first_checkpoint)
            compared = compare_view.build(lab, choices)
            data = datasets_view.build(lab, tabs, forms.data_widgets,
                                       {p.name: p.title for p in operations})
        # the Jobs view's 1.5 s timer ticks only while the Jobs tab is open
        fast, slow = gr.Timer(1.5, active=False), gr.Timer(5.0)
        # what a page fetches when it loads, in one event (app.ui.shared.Ticks), besides the
        # URL's tab and selections (navigation.wire)
        loads = Ticks()
        navigation.wire(app, nav, tabs, {"job": jobs.selected, "ck": registry.selected,
                                           "ds": data.selected}, live={"jobs": fast})
        registry.graph.load(loads)
        # Home's demo story: each step's button opens its view filled in
        story = {key: (f"plugin-{key}", forms.inputs[key],
                       lambda config, key=key: forms_view.form_values(key, config))
                 for key in ("merge", "prune", "evaluate") if key in forms.inputs}
        picked = lambda ids: [gr.Dropdown(choices=checkpoint_choices(lab),  # noqa: E731
                                          value=ids)]
        story["compare"] = ("compare", compared.checkpoint_dropdowns[:1], picked)
        story["playground"] = ("playground", [playground.picks], picked)
        home_view.wire_story(lab, home, tabs, story)

        # Live updates: poll the registry (state lives there, not in this process). The
        # timers stay outside the tabs, whose children are rendered only once opened; each
        # tick returns a digest into a hidden box, and the box's change event sends the
        # view only when it moved (jobs_view.poll, home_view.poll, registry_mark below).
        slow_ticks = Ticks()  # one event per page every 5 s for every view below
        jobs_view.poll(lab, jobs, fast, slow_ticks)
        home_view.poll(lab, home, slow_ticks, loads)
        loads.add(lambda: (gpu_summary(), job_table_view(lab)), [], [jobs.gpus, jobs.table])
        loads.add(lambda q: datasets_view.dataset_table(lab, q), [data.search], [data.table])
        dropdowns = forms.checkpoint_dropdowns + compared.checkpoint_dropdowns + \
            playground.checkpoint_dropdowns

        # the registry's digest on the slow timer; the table and every checkpoint dropdown
        # only when it (or the search) changed
        registry_shown = gr.Textbox(visible=False)

        def registry_mark(search_text):
            with lab.registry() as reg:
                return f"{reg.registry_mark()}:{search_text}"

        def refresh_registry(search_text):
            return registry_view.registry_lists(lab, search_text, len(dropdowns))

        slow_ticks.add(registry_mark, [registry.search], [registry_shown])
        slow_ticks.wire(slow)
        registry_shown.change(refresh_registry, inputs=registry.search,
                              outputs=[registry.table] + dropdowns, api_visibility="private",
                              show_progress="hidden", concurrency_limit=Ticks.CONCURRENCY,
                              concurrency_id="ticks")
        # each page load gets the registry as it is now, not as it was at server start
        loads.add(refresh_registry, [registry.search], [registry.table] + dropdowns)
        # the Datasets table as it is now whenever its tab is opened (the bar's button: a tab
        # selected by the server fires no select event)
        nav["datasets"].click(lambda q: datasets_view.dataset_table(lab, q),
                              inputs=data.search, outputs=data.table,
                              api_visibility="private", show_progress="hidden")
        # a data field's registered datasets: on page load, and when its form is opened
        every = [d for picks in forms.dataset_dropdowns.values() for d in picks]

        def refresh_datasets(n: int):  # one output: the update itself, not a list of one
            update = gr.Dropdown(choices=dataset_choices(lab))
            return update if n == 1 else [update] * n

        if every:
            loads.add(lambda: refresh_datasets(len(every)), [], every)
        for name, picks in forms.dataset_dropdowns.items():
            if picks:
                nav[f"plugin-{name}"].click(lambda n=len(picks): refresh_datasets(n),
                                            outputs=picks, api_visibility="private",
                                            show_progress="hidden")
        loads.wire_load(app)
        bound_sessions(app)  # per-page server memory is capped (see there)
    return app


# ------------------------------------------------------------------ per-page server memory
# Gradio keeps a SessionState per page (session_hash) from its first event on: a copy of every
# component's config (~0.75 MiB when the app had ~350 components; it has ~830 since the
# method-aware forms, the Playground and Home) plus what handlers returned.
# By default it drops one only past 10,000 pages, closed pages included, so a long-running
# server grew ~0.95 MiB per page load (bench/load.py --connections). The app keeps no state
# of its own per page (it all lives in the registry), so Gradio holds at most
# SESSION_CAPACITY, the least recently active out first: an open page's timer touches its
# session every 1.5 s, so closed pages and idle API clients go first. An evicted page still
# works; its next event starts from the initial config (a dropdown whose choices a handler
# set then checks values against its initial choices, unless it allows custom values).
# Not freed on disconnect (an unload listener): that makes every page hold Gradio's heartbeat
# stream open, and a uvicorn shutdown (asgi_app) then waits for every open tab. A gr.State
# anywhere does the same, so per-page values live in hidden components instead
# (tests/test_ui.py checks that no page needs a heartbeat).
# Gradio's queue also keeps its last GRADIO_ANALYTICS_MAX_EVENTS events (default 10,000, about
# 1,400 page loads) and rebuilds a pandas frame of them after every event: another ~60 MiB
# over 1,000 page loads, and CPU per event; the app keeps 1,000 unless the environment says.
# Here, not in app.ui.shared: it bounds the whole app, and tests set app.ui.SESSION_CAPACITY.
SESSION_CAPACITY = 64
ANALYTICS_EVENTS = 1000


def bound_sessions(app) -> None:
    """Cap the per-page sessions `app` (a gr.Blocks, before `.queue()`) keeps, and Gradio's
    event records. `launch()` must get `state_session_capacity=app.state_session_capacity`
    (it overwrites the attribute); gr.mount_gradio_app reads the attribute."""
    import os

    app.state_session_capacity = SESSION_CAPACITY
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", str(ANALYTICS_EVENTS))  # for .queue()
