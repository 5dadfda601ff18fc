"""The Registry offers an export's GGUF file for download, in a real browser (chromium via
playwright): the "Download .gguf" button shows only for a checkpoint whose folder holds a
.gguf, and serves the file byte for byte; the Export GGUF tab shows its form. Screenshots go to
test-artifacts/screenshots/export-*.png."""

import pytest

from tests.test_browser import (CHROMIUM, FLAGS, SHOTS, expect, open_tab, playwright,
                                serve, shot)
from tests.test_browser_lineage import open_registry

pytestmark = pytest.mark.slow


def test_registry_downloads_an_exports_gguf_file(lab_dir, tiny_model_dir, tmp_path):
    from app.checkpoints import import_checkpoint, publish
    from app.lab import Lab
    from ops.gguf_export import export_gguf

    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")
    lab = Lab(lab_dir)
    folder = lab.checkpoints_dir / ".tmp-test-export"
    folder.mkdir(parents=True)
    result = export_gguf(tiny_model_dir, folder / "tiny-q8_0.gguf", "Q8_0").as_metadata()
    result.pop("path")  # the temporary folder's, as the plugin does
    with lab.registry() as reg:
        source = import_checkpoint(lab, reg, str(tiny_model_dir), name="tiny")
        export = publish(lab, reg, folder, name="tiny-q8_0", relation="export",
                         parents=[{"id": source["id"], "role": "source"}],
                         metadata={"file": "tiny-q8_0.gguf", **result})
    data = (lab.checkpoints_dir / export["id"] / "tiny-q8_0.gguf").read_bytes()
    proc, url = serve(lab_dir, "--no-demo")
    SHOTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=30_000)  # a loaded machine answers slowly
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(url)
            page.get_by_role("button", name="Run").first.wait_for()
            open_registry(page)
            box = page.get_by_label("Selected checkpoint")
            box.fill(source["id"])  # a model folder: no .gguf button
            box.press("Enter")
            expect(page.locator("#load-code")).to_contain_text("from_pretrained")
            expect(page.locator("#download-gguf")).to_be_hidden()
            box.fill(export["id"])
            box.press("Enter")
            expect(page.locator("#load-code")).to_contain_text('gguf_file="tiny-q8_0.gguf"')
            expect(page.locator("#download-gguf")).to_be_visible()
            page.locator("#download-gguf").click()
            expect(page.locator("#download-message")).to_contain_text("GGUF file ready")
            link = page.locator("#download-gguf-file a[href*='tiny-q8_0.gguf']")
            expect(link).to_have_count(1)
            shot(page, "export-1-registry-gguf-download")
            assert page.request.get(link.get_attribute("href")).body() == data
            # "Use as input of" preselects evaluate; the export's own form
            expect(page.locator("#next-step")).to_contain_text("imports (dequantizes)")
            open_tab(page, "Export GGUF")
            expect(page.get_by_text("Tensor type of the 2-D weights").first).to_be_visible()
            shot(page, "export-2-form")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)
