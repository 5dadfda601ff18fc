"""One tab per plugin: the form generated from its Config's JSON schema (app/forms.py), with
Run, Show YAML / CLI, Preview data and Load YAML.

The form follows the Config's form hints: a method selector shows only the fields that method
reads, basic fields come first and the rest sit under "Advanced", GPU fields appear only on a
lab with GPUs; a hidden field is never submitted. A value the Config refuses comes back next
to its field, in words ("sparsity: got 1.5; expected a number below 1"), and in the form's
message."""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import plugins
from app import forms
from app import jobs as jobs_mod
from app.lab import Lab
from app.ui import navigation
from app.ui.shared import dataset_choices, request_user, text_md, upload_to_box
from plugins.kit import markup


# ---------------------------------------------------------------------------------- handlers
def lab_has_gpus(lab: Lab) -> bool:
    """Whether the lab's jobs may use GPUs (lab.toml's gpus, else what nvidia-smi reports)."""
    return bool(jobs_mod.lab_gpus(lab))


def _gpu_lab(lab: Lab, specs: list, gpu_lab: bool | None) -> bool | None:
    """The lab's GPU answer, asked only when the form has fields that depend on it."""
    if gpu_lab is None and any(s.lab for s in forms.leaves(specs)):
        return lab_has_gpus(lab)
    return gpu_lab


def _form_config(specs: list, values: list, gpu_lab: bool | None) -> dict:
    """The config the form submits: every problem a widget value has at once (FormError, one
    line per field), and without the fields the form hides."""
    values = list(values)
    hidden = forms.hidden_paths(specs, values, gpu_lab) if len(values) == len(
        forms.leaves(specs)) else set()
    problems = forms.widget_problems(specs, values, hidden)
    if problems:
        raise forms.FormError("\n".join(f"field '{path}': {text}"
                                         for path, text in problems.items()))
    return forms.values_to_config(specs, values, hidden)


def _problem_lines(error: Exception) -> str:
    items = error.problems if isinstance(error, plugins.ConfigError) else str(error).split("\n")
    return markup.lines(forms.plain(p) for p in items)


def preview_data(lab: Lab, plugin_name: str, values: list, gpu_lab: bool | None = None) -> str:
    """The plugin's data preview for the form as filled in (markdown)."""
    specs = forms.form_spec(plugins.get(plugin_name).Config)
    try:
        data = _form_config(specs, values, _gpu_lab(lab, specs, gpu_lab))
        return jobs_mod.preview(lab, plugin_name, data)
    except forms.FormError as e:
        return "**No preview.**\n\n" + _problem_lines(e)
    except plugins.ConfigError as e:
        return "**No preview: fix these fields.**\n\n" + _problem_lines(e)


def submit_form(lab: Lab, plugin_name: str, values: list, user: str | None = None,
                gpu_lab: bool | None = None) -> tuple[str, str]:
    """Submit a form; returns (markdown message, job id or ""). `gpu_lab`: whether the lab
    has GPUs (the form hides GPU fields on a lab without), None: ask the lab."""
    plugin = plugins.get(plugin_name)
    specs = forms.form_spec(plugin.Config)
    try:
        data = _form_config(specs, values, _gpu_lab(lab, specs, gpu_lab))
        job = jobs_mod.submit(lab, plugin_name, data, user=user)
    except forms.FormError as e:
        return "**Not submitted.**\n\n" + _problem_lines(e), ""
    except plugins.ConfigError as e:
        return "**Not submitted: fix these fields.**\n\n" + _problem_lines(e), ""
    return (f"Queued **{navigation.job_link(job['id'])}**: click it to follow the job.",
            job["id"])


def field_errors(lab: Lab, plugin_name: str, values: list,
                 gpu_lab: bool | None = None) -> dict[str, str]:
    """{field path: problem} for the form as filled in, each problem shown under its field:
    the widget values first (not a number, bad YAML, out of bounds), then everything the
    submit would refuse (validation, unknown checkpoints, the lab's checks)."""
    specs = forms.form_spec(plugins.get(plugin_name).Config)
    values = list(values)
    hidden = forms.hidden_paths(specs, values, _gpu_lab(lab, specs, gpu_lab))
    problems = forms.widget_problems(specs, values, hidden)
    if problems:
        return problems
    try:
        jobs_mod.check_config(lab, plugin_name, forms.values_to_config(specs, values, hidden))
    except plugins.ConfigError as e:
        return forms.problems_by_field(specs, e.problems, hidden)
    except forms.FormError:
        return {}
    return {}


def preview(plugin_name: str, values: list, gpu_lab: bool | None = None) -> str:
    plugin = plugins.get(plugin_name)
    try:
        data = _form_config(forms.form_spec(plugin.Config), values, gpu_lab)
    except forms.FormError as e:
        return "".join(f"# {line}\n" for line in str(e).split("\n"))
    return (f"# {plugin_name}.yaml  (run it with: weightsmith run {plugin_name} "
            f"{plugin_name}.yaml --wait)\n" + forms.to_yaml(data))


def load_yaml(plugin_name: str, path: str | None) -> tuple[list | None, str]:
    """(form values, note) from a YAML file; values None (form unchanged) when unreadable."""
    plugin = plugins.get(plugin_name)
    specs = forms.form_spec(plugin.Config)
    if not path:
        return None, ""
    try:  # the same reader as `weightsmith run`, a plain mergekit file for merge included
        raw = jobs_mod.load_config_file(path)
        data = jobs_mod.as_plugin_config(plugin, raw, where=Path(path).name)
    except plugins.ConfigError as e:
        return None, "**Could not load the file:** " + markup.md("; ".join(e.problems))
    unknown = forms.unknown_keys(specs, data)
    note = f"Loaded {markup.md(Path(path).name)}."
    if data is not raw:  # the plugin's foreign_config made it this plugin's config
        note += (f" Read as a file of the tool {markup.md(plugin.title)} replaces; it fills "
                 f"{markup.md(', '.join(map(str, data)))}.")
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
# a field's error line: under the field, in words, the field named (never a config dict)
ERROR_STYLE = "color:#b91c1c;font-size:var(--text-md);margin:-6px 0 4px 4px"


def error_html(path: str, problem: str) -> str:
    return (f'<div class="ws-field-error" style="{ERROR_STYLE}">&#9888; '
            f'<span style="font-weight:600">{markup.html(path)}</span>: '
            f'{markup.html(problem)}</div>')


def _dom_id(*parts: str) -> str:
    return "-".join(p.replace(".", "-").replace("_", "-") for p in parts)


def _widget(gr, spec: forms.FieldSpec, value, choices):
    label = spec.label + (" *" if spec.required else "")
    info = spec.help or None
    if spec.kind == forms.CHECKBOX:
        return gr.Checkbox(value=value, label=label, info=info)
    if spec.kind == forms.SLIDER:
        # inside the Config's bounds: an excluded bound (sparsity < 1) is one step beyond the
        # slider's end, so the slider cannot pick a value the Config refuses (app/forms.py)
        return gr.Slider(minimum=spec.slider_min, maximum=spec.slider_max, step=spec.step,
                         value=value, label=label, info=info)
    if spec.kind == forms.NUMBER and spec.optional:
        # gr.Number cannot be empty (it sends 0), so an optional number is a text box
        return gr.Textbox(value=value, label=label, info=info,
                          placeholder="empty: " + (str(spec.default) if spec.default is not None
                                                   else "the default"))
    if spec.kind == forms.NUMBER:
        # no minimum/maximum here: gr.Number refuses an out-of-range value before any handler
        # runs, with a toast far from the field; the form's check says it under the field
        return gr.Number(value=value, label=label, info=info,
                         precision=0 if spec.integer else None,
                         step=1 if spec.integer else (spec.step or 0.01))
    if spec.kind == forms.DROPDOWN:
        return gr.Dropdown(choices=spec.choices, value=value, label=label, info=info)
    if spec.kind in (forms.CHECKPOINT, forms.CHECKPOINTS):
        return gr.Dropdown(choices=choices, value=value, label=label, info=info,
                           allow_custom_value=True, multiselect=spec.kind == forms.CHECKPOINTS,
                           filterable=True)
    if spec.kind == forms.FILE:
        return gr.Textbox(value=value, label=label, scale=4,
                          info=(info or "") + " (a path on the server, a registered "
                                              "dataset's id, or upload a file)")
    if spec.kind == forms.DATA:
        return gr.Textbox(value=value, label=label, scale=4,
                          info=(info or "") + " (a path on the server, a registered "
                                              "dataset's id, a Hub dataset id, or upload "
                                              "a file)")
    if spec.kind == forms.YAML:
        return gr.Textbox(value=value, label=label, info=(info or "") + " (YAML)")
    return gr.Textbox(value=value, label=label, info=info,
                      lines=10 if spec.multiline else 1, max_lines=40 if spec.multiline else 1)


@dataclass
class FormField:
    """One field's components: its widget, the column that shows or hides it (None: always
    shown), and its error line."""

    spec: forms.FieldSpec
    widget: object
    box: object
    error: object
    datasets: object = None  # a data field's "Registered dataset" dropdown


def _field(gr, lab: Lab, plugin_name: str, spec: forms.FieldSpec, value, choices,
           shown: bool, data_choices: list) -> FormField:
    """A field's widget (with an Upload button and a registered-dataset dropdown for a file
    or data field) and its error line, in a column of their own when the method or the lab
    may hide them."""
    box = gr.Column(visible=shown, elem_id=_dom_id("field", plugin_name, spec.path),
                    min_width=0) if spec.methods is not None or spec.lab else None
    registered = None
    with box or contextlib.nullcontext():
        if spec.kind in forms.UPLOADABLE:
            with gr.Row(equal_height=True):
                widget = _widget(gr, spec, value, choices)
                registered = gr.Dropdown(
                    choices=data_choices, value=None, label="or a registered dataset",
                    scale=2, filterable=True,
                    elem_id=_dom_id("dataset", plugin_name, spec.path))
                upload = gr.UploadButton("Upload", type="filepath", size="sm", scale=0,
                                         elem_id=_dom_id("upload", plugin_name, spec.path))

            def on_upload(request: gr.Request, f):
                return upload_to_box(lab, f, request_user(request))

            def on_pick(ds_id):  # the dataset's id goes into the box; the dropdown clears
                return (ds_id, None) if ds_id else (gr.skip(), gr.skip())

            upload.upload(on_upload, inputs=upload, outputs=widget, api_visibility="private")
            registered.input(on_pick, inputs=registered, outputs=[widget, registered],
                             api_visibility="private", show_progress="hidden")
        else:
            widget = _widget(gr, spec, value, choices)
        error = gr.HTML(visible=False, elem_id=_dom_id("error", plugin_name, spec.path),
                        padding=False)
    return FormField(spec, widget, box, error, registered)


def _layout(gr, specs: list, advanced: bool, make) -> None:
    """The fields of one section (basic or advanced) in Config order; a nested model's
    fields in an accordion of their own."""
    for spec in specs:
        if spec.kind == forms.GROUP:
            if any(leaf.advanced == advanced for leaf in forms.leaves(spec.children)):
                with gr.Accordion(spec.label, open=False):
                    if spec.help:
                        gr.Markdown(spec.help)
                    _layout(gr, spec.children, advanced, make)
        elif spec.advanced == advanced:
            make(spec)


def error_updates(gr, fields: list[FormField], problems: dict[str, str], advanced) -> list:
    """The error lines for `problems` (every other line emptied), then the Advanced
    accordion, opened when one of its fields has a problem."""
    out = [gr.update(value=error_html(f.spec.path, problems[f.spec.path]), visible=True)
           if f.spec.path in problems else gr.update(value="", visible=False) for f in fields]
    if advanced is not None:
        inside = any(f.spec.advanced and f.spec.path in problems for f in fields)
        out.append(gr.update(open=True) if inside else gr.skip())
    return out


# ------------------------------------------------------------------------------------ layout
@dataclass
class PluginForms:
    """What the other views need from the plugin tabs."""

    checkpoint_dropdowns: list = field(default_factory=list)  # refreshed with the registry
    first_checkpoint: dict = field(default_factory=dict)  # plugin name -> its first one
    inputs: dict = field(default_factory=dict)  # plugin name -> its widgets, in leaves order
    # plugin name -> its data fields' "registered dataset" dropdowns (refreshed on opening)
    dataset_dropdowns: dict = field(default_factory=dict)
    data_widgets: dict = field(default_factory=dict)  # (plugin name, field path) -> widget


def form_values(plugin_name: str, config: dict) -> list:
    """A config's values for the plugin form's widgets (PluginForms.inputs order)."""
    return forms.config_to_values(forms.form_spec(plugins.get(plugin_name).Config), config)


def build(lab: Lab, found: dict, choices: list) -> PluginForms:
    """One tab per plugin in `found` (inside the app's gr.Tabs), `choices` in its checkpoint
    dropdowns. GPU fields show only if the lab has GPUs (asked once, here)."""
    made = PluginForms()
    gpu_lab = lab_has_gpus(lab)
    data_choices = dataset_choices(lab)
    for plugin in sorted(found.values(), key=lambda p: (p.order, p.title)):
        _plugin_tab(lab, plugin, choices, made, gpu_lab, data_choices)
    return made


def _plugin_tab(lab: Lab, plugin, choices: list, made: PluginForms, gpu_lab: bool,
                data_choices: list) -> None:
    import gradio as gr

    name = plugin.name
    with gr.Tab(plugin.title, id=f"plugin-{name}"):
        text_md(plugin.description)
        specs = forms.form_spec(plugin.Config)
        flat = forms.leaves(specs)
        values = dict(zip([s.path for s in flat], forms.config_to_values(specs, {})))
        chooser = forms.selector(specs)
        method = values[chooser.path] if chooser is not None else None
        method_choices = chooser.choices if chooser is not None else None
        built: dict[str, FormField] = {}

        def make(spec):
            shown = forms.on_lab(spec, gpu_lab) and forms.for_method(spec, method,
                                                                   method_choices)
            built[spec.path] = _field(gr, lab, name, spec, values[spec.path], choices, shown,
                                      data_choices)

        _layout(gr, specs, False, make)
        advanced = None
        if any(s.advanced for s in flat):
            with gr.Accordion("Advanced", open=False,
                              elem_id=_dom_id("advanced", name)) as advanced:
                _layout(gr, specs, True, make)
        fields = [built[s.path] for s in flat]  # in `leaves` order: the API's inputs
        inputs = [f.widget for f in fields]
        made.inputs[name] = inputs
        made.dataset_dropdowns[name] = [f.datasets for f in fields if f.datasets is not None]
        made.data_widgets.update({(name, f.spec.path): f.widget for f in fields
                                  if f.datasets is not None})
        made.checkpoint_dropdowns += [f.widget for f in fields
                                      if f.spec.kind in (forms.CHECKPOINT, forms.CHECKPOINTS)]
        # "Use as input" fills the first checkpoint field every method shows (Merge: its
        # models, not the base model that linear hides), else the first one
        firsts = [f for f in fields if f.spec.kind in (forms.CHECKPOINT, forms.CHECKPOINTS)]
        first = next((f for f in firsts if f.box is None), firsts[0] if firsts else None)
        if first is not None:
            made.first_checkpoint[name] = first.widget
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
        return submit_form(lab, name, v, user=request_user(request), gpu_lab=gpu_lab)

    errors = [f.error for f in fields] + ([advanced] if advanced is not None else [])

    def on_check(*v):
        return error_updates(gr, fields, field_errors(lab, name, v, gpu_lab), advanced)

    run.click(on_run, inputs=inputs, outputs=[message, job_id], api_name=f"run_{name}")
    run.click(on_check, inputs=inputs, outputs=errors, api_visibility="private",
              show_progress="hidden")
    show.click(lambda *v: preview(name, v, gpu_lab), inputs=inputs, outputs=code,
               api_name=f"preview_{name}")
    if plugin.preview is not None:
        peek.click(lambda *v: preview_data(lab, name, v, gpu_lab), inputs=inputs,
                   outputs=message, api_name=f"preview_data_{name}")
        peek.click(on_check, inputs=inputs, outputs=errors, api_visibility="private",
                   show_progress="hidden")
    switching = [f for f in fields if f.box is not None and f.spec.methods is not None]
    if chooser is not None and switching:
        def on_method(chosen):  # the fields this method reads; the others hidden, unsent
            return [gr.update(visible=forms.on_lab(f.spec, gpu_lab) and
                              forms.for_method(f.spec, chosen, method_choices))
                    for f in switching]

        built[chooser.path].widget.change(
            on_method, inputs=built[chooser.path].widget, outputs=[f.box for f in switching],
            api_visibility="private", show_progress="hidden")
    upload.upload(lambda p: fill_form(load_yaml(name, p), len(inputs)), inputs=upload,
                  outputs=inputs + [message], api_visibility="private")
