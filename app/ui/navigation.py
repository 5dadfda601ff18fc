"""Navigation: the bar of tab buttons (it wraps on a narrow screen, where Gradio's tab strip
folds tabs into a "..." menu), and the page's state in the URL (?tab=ID&job=ID&ck=ID&ds=ID).

The server side is here: `restore` reads a page's query parameters when it loads and opens
that tab, job, checkpoint and dataset. The browser side is app/ui/static/url_state.js: it writes the
state back into the address bar as the person moves, and opens in-app links (`job_link`)
without a reload."""

import re
from urllib.parse import urlencode

# what a job or checkpoint id in a URL may be: ids are short words; anything else is dropped
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


def link(text: str, **params: str) -> str:
    """A Markdown link that opens a tab (and a job or checkpoint) in the same page; `text`
    must already be safe Markdown (plugins.kit.markup.md)."""
    return f"[{text}](?{urlencode(params)})"


def job_link(job_id: str) -> str:
    return link(job_id, tab="jobs", job=job_id) if _ID.fullmatch(job_id) else job_id


BOXES = ("job", "ck", "ds")  # the selected job, checkpoint and dataset, in the URL


def restore(query: dict, tab_ids: list[str]) -> tuple[str | None, ...]:
    """(tab, job, checkpoint, dataset) a page's query parameters ask for; None where absent
    or not one this app has (a tab id it does not know, an id with characters no id has)."""
    tab = query.get("tab")
    ids = [query.get(name) for name in BOXES]
    return (tab if tab in tab_ids else None,
            *[v if isinstance(v, str) and _ID.fullmatch(v) else None for v in ids])


def tab_ids(tabs) -> list[str]:
    """The ids of the top-level tabs of a gr.Tabs, in order."""
    import gradio as gr

    return [t.id for t in tabs.children if isinstance(t, gr.Tab)]


def bar(entries: list[tuple[str, str]]) -> dict:
    """The navigation bar, made where this is called (above the tabs): a button per (tab id,
    label) in `entries`, in order; {tab id: button}. `wire` connects them once the tabs
    exist."""
    import gradio as gr

    with gr.Row(elem_id="ws-nav"):
        return {tid: gr.Button(label, size="sm", elem_id=f"nav-{tid}",
                               elem_classes=["ws-nav-btn"]) for tid, label in entries}


def wire(app, buttons: dict, tabs, boxes: dict, live: dict | None = None) -> None:
    """Each button opens its tab; a page load opens the tab, and fills the job, checkpoint
    and dataset boxes (`boxes`: BOXES name -> its selected-id textbox, where the page has
    one) its URL asks for. `live`: tab id -> a gr.Timer that ticks only while that tab is
    open (every opening goes through a button or the page load). Each top-level gr.Tab gets
    elem_id "tab-ID": url_state.js reads which one shows."""
    import gradio as gr

    ids = tab_ids(tabs)
    if ids != list(buttons):
        raise RuntimeError(f"the navigation bar {list(buttons)} does not match the tabs {ids}")
    for tab in tabs.children:
        if isinstance(tab, gr.Tab):
            tab.elem_id = f"tab-{tab.id}"
    live = live or {}
    timers = list(live.values())

    def timer_states(tab: str | None) -> list:
        return [gr.Timer(active=tab == t) for t in live]

    for tid, button in buttons.items():
        button.click(lambda t=tid: (gr.Tabs(selected=t), *timer_states(t)),
                     outputs=[tabs, *timers], api_visibility="private",
                     show_progress="hidden")

    names = [n for n in BOXES if boxes.get(n) is not None]

    def on_load(request: gr.Request):
        tab, *values = restore(dict(request.query_params) if request else {}, ids)
        wanted = dict(zip(BOXES, values))
        return (gr.Tabs(selected=tab) if tab else gr.skip(), *timer_states(tab),
                *[wanted[n] if wanted[n] else gr.skip() for n in names])

    # its own load event, not one part of the page's (app.ui.shared.Ticks): it returns as soon
    # as it can, because a tab opened before it returns would be closed again by its `tabs`
    app.load(on_load, outputs=[tabs, *timers, *[boxes[n] for n in names]],
             api_visibility="private", show_progress="hidden")
