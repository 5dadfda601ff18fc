"""The Home tab's handlers, the demo story's states and presets, and the URL state's server
side (the browser side is walked in tests/test_journey.py)."""

import plugins
from app import demo
from app.ui import home_view, navigation


def test_restore_opens_only_known_tabs_and_plain_ids():
    tabs = ["home", "jobs", "registry", "plugin-merge"]
    assert navigation.restore({"tab": "jobs", "job": "job-0123abcd", "ck": "ck-1",
                               "ds": "ds-0123456789ab"}, tabs) == \
        ("jobs", "job-0123abcd", "ck-1", "ds-0123456789ab")
    assert navigation.restore({}, tabs) == (None, None, None, None)
    hostile = ["<script>alert(1)</script>", "job\x00x", "a" * 101, "../etc", " job", ""]
    for value in hostile:
        assert navigation.restore({"tab": value, "job": value, "ck": value, "ds": value},
                                  tabs) == (None, None, None, None), value
    assert navigation.restore({"tab": "admin"}, tabs)[0] is None


def test_job_links_open_the_job_in_the_page():
    assert navigation.job_link("job-0123abcd") == "[job-0123abcd](?tab=jobs&job=job-0123abcd)"
    assert navigation.job_link("<b>x</b>") == "<b>x</b>"  # never a link; callers escape it


def _demo_rows(reg, merged=False):
    base = reg.add_checkpoint(name=demo.DEMO_NAME, relation="pretrain")
    skills = [reg.add_checkpoint(name=n, relation="finetune", parents=[{"id": base["id"]}])
              for n in demo.SKILLS]
    merge = None
    if merged:
        merge = reg.add_checkpoint(name="my merge", relation="merge", parents=[
            {"id": s["id"], "weight": 1.0} for s in skills] + [
            {"id": base["id"], "role": "base"}])
    return base, skills, merge


def test_no_story_on_a_lab_without_the_demo(lab):
    with lab.registry() as reg:
        reg.add_checkpoint(name="mine", relation="import")
    assert demo.demo_story(lab) == []
    assert home_view.story_markdown([]) == ""


def test_the_story_moves_on_as_the_registry_grows(lab):
    with lab.registry() as reg:
        base, skills, _ = _demo_rows(reg)
    states = {s.key: s.state for s in demo.demo_story(lab)}
    assert states == {"base": "done", "skills": "done", "merge": "next", "compare": "later",
                      "playground": "later", "prune": "later", "evaluate": "later"}
    plugin, config = demo.story_preset(lab, "merge")
    assert plugin == "merge" and config["method"] == "ties"
    assert config["models"] == [s["id"] for s in skills] and config["base_model"] == base["id"]
    plugins.get("merge").Config(**config)  # a config the form accepts as it is
    assert demo.story_preset(lab, "prune") is None  # nothing merged yet

    with lab.registry() as reg:
        merge = reg.add_checkpoint(name="my merge", relation="merge", parents=[
            {"id": s["id"], "weight": 1.0} for s in skills] + [
            {"id": base["id"], "role": "base"}])
    states = {s.key: s.state for s in demo.demo_story(lab)}
    assert states["merge"] == "done" and states["prune"] == "next"
    assert states["compare"] == states["playground"] == "next"
    assert demo.story_preset(lab, "compare") == (
        "compare", [merge["id"], *[s["id"] for s in skills], base["id"]])
    plugin, config = demo.story_preset(lab, "prune")
    assert plugin == "prune" and config["checkpoint"] == merge["id"]
    plugins.get("prune").Config(**config)

    with lab.registry() as reg:
        pruned = reg.add_checkpoint(name="pruned", relation="prune",
                                    parents=[{"id": merge["id"]}])
    states = {s.key: s.state for s in demo.demo_story(lab)}
    assert states["prune"] == "done" and states["evaluate"] == "next"
    assert demo.story_preset(lab, "evaluate") == ("evaluate", {"checkpoint": pruned["id"]})
    with lab.registry() as reg:
        reg.add_evaluation(checkpoint_id=pruned["id"], task="demo", metric="acc", value=0.5)
    assert {s.key: s.state for s in demo.demo_story(lab)}["evaluate"] == "done"


def test_a_deleted_merge_is_not_the_story_s_merge(lab):
    with lab.registry() as reg:
        _, _, merge = _demo_rows(reg, merged=True)
        reg.soft_delete_checkpoint(merge["id"], user=None)
    assert {s.key: s.state for s in demo.demo_story(lab)}["merge"] == "next"


def test_home_lists_running_jobs_as_links_and_escapes_their_words(lab):
    from app.jobs import submit

    assert "No job is running" in home_view.active_jobs(lab)
    job = submit(lab, "test_sleep", {"seconds": 1, "pid_file": str(lab.root / "p")})
    with lab.registry() as reg:
        reg.update_job(job["id"], progress_message="<img src=x onerror=alert(1)>")
    text = home_view.active_jobs(lab)
    assert f"[{job['id']}](?tab=jobs&job={job['id']})" in text
    assert "<img" not in text and "queued #1" in text
    assert "1 queued" in home_view.lab_summary(lab)


def test_use_as_input_puts_a_list_into_a_field_of_several():
    from app.ui import registry_view

    out = registry_view.use_as_input("merge", "ck-1", ["train", "merge"], frozenset({"merge"}))
    assert out[2] == ["ck-1"] and out[1] != "ck-1"
    out = registry_view.use_as_input("train", "ck-1", ["train", "merge"], frozenset({"merge"}))
    assert out[1] == "ck-1"
