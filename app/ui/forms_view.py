"""One tab per plugin: the form generated from its Config's JSON schema (app/forms.py), with
Run, Show YAML / CLI, Preview data and Load YAML."""

from dataclasses import dataclass, field
from pathlib import Path

import plugins
from app import forms
from app import jobs as jobs_mod
from app.lab import Lab
from app.ui.shared import request_user, text_md, upload_to_box
from plugins.kit import markup


# ---------------------------------------------------------------------------------- handlers
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


def fill_form(loaded: tuple[list | None, str], n_inputs: int) -> tuple:
    """load_yaml's (values, note) as the form's outputs: every field, then the message; the
    fields unchanged when the file was unreadable."""
    import gradio as gr

    values, note = loaded
    return (*(values if values is not None else [gr.skip()] * n_inputs), note)


# ----------------------------------------------------------------------------------- widgets
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


# ------------------------------------------------------------------------------------ layout
@dataclass
class PluginForms:
    """What the other views need from the plugin tabs."""

    checkpoint_dropdowns: list = field(default_factory=list)  # refreshed with the registry
    first_checkpoint: dict = field(default_factory=dict)  # plugin name -> its first one


def build(lab: Lab, found: dict, choices: list) -> PluginForms:
    """One tab per plugin in `found` (inside the app's gr.Tabs), `choices` in its checkpoint
    dropdowns."""
    made = PluginForms()
    for plugin in sorted(found.values(), key=lambda p: (p.order, p.title)):
        _plugin_tab(lab, plugin, choices, made)
    return made


def _plugin_tab(lab: Lab, plugin, choices: list, made: PluginForms) -> None:
    import gradio as gr

    name = plugin.name
    with gr.Tab(plugin.title, id=f"plugin-{name}"):
        text_md(plugin.description)
        specs = forms.form_spec(plugin.Config)
        widgets: list = []
        _build_widgets(gr, lab, specs, forms.config_to_values(specs, {}), choices, widgets)
        inputs = [w for _, w in widgets]
        made.checkpoint_dropdowns += [w for s, w in widgets
                                      if s.kind in (forms.CHECKPOINT, forms.CHECKPOINTS)]
        for s, w in widgets:
            if s.kind == forms.CHECKPOINT:
                made.first_checkpoint[name] = w
                break
        with gr.Row():
            run = gr.Button("Run", variant="primary")
            show = gr.Button("Show YAML / CLI")
            peek = gr.Button("Preview data", visible=plugin.preview is not None)
            upload = gr.File(label="Load YAML", file_types=[".yaml", ".yml"],
                             type="filepath", height=80)
        message = text_md(elem_id=f"message-{name}")
        job_id = gr.Textbox(visible=False)
        code = gr.Code(language="yaml", label="What will be submitted")

    def on_run(request: gr.Request, *v):
        return submit_form(lab, name, v, user=request_user(request))

    run.click(on_run, inputs=inputs, outputs=[message, job_id], api_name=f"run_{name}")
    show.click(lambda *v: preview(name, v), inputs=inputs, outputs=code,
               api_name=f"preview_{name}")
    if plugin.preview is not None:
        peek.click(lambda *v: preview_data(lab, name, v), inputs=inputs, outputs=message,
                   api_name=f"preview_data_{name}")
    upload.upload(lambda p: fill_form(load_yaml(name, p), len(inputs)), inputs=upload,
                  outputs=inputs + [message], api_visibility="private")
