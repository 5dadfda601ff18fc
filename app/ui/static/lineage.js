// Lineage graphs: every Mermaid diagram inside an element with class "ws-lineage"
// (app/ui/registry_view.py: lineage_block, graph_markdown), on any tab.
// - A click on a node opens its checkpoint: the Registry tab (id "registry") is selected and
//   its "Selected checkpoint" box (#selected-checkpoint) set, so its .change handlers run;
//   a dataset node (an id "ds-...") opens the Datasets tab the same way.
//   Node ids are registry/lineage.py's mermaid_id: "n_" then the checkpoint id with every
//   character but letters and digits written as _<hex code>_; Mermaid draws a node as
//   <g id="...flowchart-<node id>-<n>">.
// - Drag pans; the wheel and the + / − / fit buttons zoom: a CSS transform on the svg.
// Written by hand, not a pan-zoom library: the app ships no npm bundle (Gradio serves these
// files inline in the page's <head>), and ~150 lines cover it. The state lives on each svg,
// because Gradio's Markdown replaces the svg whenever the graph changes. Reads no server data.
(() => {
  if (window.__wsLineage) return;  // the head may be inserted twice (mount + launch)
  window.__wsLineage = true;
  const MIN = 0.1, MAX = 8, STEP = 1.25;
  const views = new WeakMap();  // svg -> {x, y, k}

  function checkpointOf(node) {
    const m = /flowchart-(n_[A-Za-z0-9_]*)-\d+$/.exec(node.id || "");
    if (!m) return null;
    return m[1].slice(2).replace(/_([0-9a-f]+)_/g,
                                 (_, hex) => String.fromCodePoint(parseInt(hex, 16)));
  }

  function setBox(box, value) {  // the native setter, so Svelte's bound value sees it
    const proto = box instanceof HTMLTextAreaElement ? HTMLTextAreaElement.prototype
                                                     : HTMLInputElement.prototype;
    Object.getOwnPropertyDescriptor(proto, "value").set.call(box, value);
    box.dispatchEvent(new Event("input", { bubbles: true }));
    box.dispatchEvent(new Event("change", { bubbles: true }));
    box.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
  }

  function registryTab() {  // the navigation bar's button, else Gradio's own tab button
    return document.getElementById("nav-registry")
      || document.querySelector('button[role="tab"][data-tab-id="registry"]');
  }

  function openCheckpoint(id) {
    if (window.wsOpen) {  // url_state.js: opens the tab and sets the box until it holds
      // a dataset node (registry/datasets.py ids) opens the Datasets tab
      window.wsOpen(/^ds-/.test(id) ? { tab: "datasets", ds: id } : { tab: "registry", ck: id });
      return;
    }
    const box = () => document.querySelector(
      "#selected-checkpoint textarea, #selected-checkpoint input");
    if (!box() || !box().offsetParent) {  // not rendered yet, or on a hidden tab
      const tab = registryTab();
      if (tab) tab.click();
    }
    let tries = 0;
    (function fill() {  // the tab's children are rendered once it is opened
      const found = box();
      if (found && found.offsetParent) {
        setBox(found, id);
        found.closest("#selected-checkpoint").scrollIntoView({ block: "center" });
      } else if (tries++ < 300) {  // 15 s: a busy server renders the tab slowly
        setTimeout(fill, 50);
      }
    })();
  }

  function apply(svg) {
    const v = views.get(svg);
    svg.style.transform = `translate(${v.x}px, ${v.y}px) scale(${v.k})`;
  }

  function zoomAt(svg, factor, cx, cy) {  // (cx, cy): client point that stays in place
    const v = views.get(svg), box = svg.parentElement.getBoundingClientRect();
    const k = Math.min(MAX, Math.max(MIN, v.k * factor));
    const px = cx - box.left, py = cy - box.top;
    v.x = px - (px - v.x) * (k / v.k);
    v.y = py - (py - v.y) * (k / v.k);
    v.k = k;
    apply(svg);
  }

  function fit(svg) {  // the whole graph in view, never enlarged
    const v = views.get(svg), box = svg.parentElement.getBoundingClientRect();
    const r = svg.getBoundingClientRect();
    const w = r.width / v.k, h = r.height / v.k;
    const k = Math.min(1, box.width / w || 1, box.height / h || 1);
    Object.assign(v, { k, x: Math.max(0, (box.width - w * k) / 2), y: 0 });
    apply(svg);
  }

  // The first view: the whole graph when it stays readable (scale >= 1/2), else readable
  // size around the root (the selected checkpoint), or the top of the graph.
  function first(svg) {
    fit(svg);
    const v = views.get(svg);
    if (v.k >= 0.5) return;
    const box = svg.parentElement.getBoundingClientRect(), r = svg.getBoundingClientRect();
    const w = r.width / v.k, k = Math.min(1, Math.max(0.5, box.width / w));
    const root = svg.querySelector("g.node.root");
    if (root) {
      const n = root.getBoundingClientRect();
      const cx = (n.left + n.width / 2 - r.left) / v.k, cy = (n.top + n.height / 2 - r.top) / v.k;
      Object.assign(v, { k, x: box.width / 2 - cx * k, y: box.height / 2 - cy * k });
    } else {
      Object.assign(v, { k, x: (box.width - w * k) / 2, y: 0 });
    }
    apply(svg);
  }

  function tool(label, title, act) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.setAttribute("aria-label", title);
    b.addEventListener("click", (e) => { e.stopPropagation(); act(); });
    return b;
  }

  function setup(svg) {
    const pane = svg.parentElement;
    svg.dataset.wsReady = "1";
    pane.classList.add("ws-lineage-pane");
    views.set(svg, { x: 0, y: 0, k: 1 });
    const center = (f) => {
      const b = pane.getBoundingClientRect();
      zoomAt(svg, f, b.left + b.width / 2, b.top + b.height / 2);
    };
    const tools = document.createElement("div");
    tools.className = "ws-lineage-tools";
    tools.append(tool("+", "Zoom in", () => center(STEP)),
                 tool("−", "Zoom out", () => center(1 / STEP)),
                 tool("fit", "Fit the graph", () => fit(svg)));
    pane.querySelectorAll(".ws-lineage-tools").forEach((t) => t.remove());
    pane.append(tools);
    for (const node of svg.querySelectorAll("g.node")) {
      const id = checkpointOf(node);
      if (id) {
        node.dataset.checkpoint = id;
        node.setAttribute("role", "link");
        node.setAttribute("tabindex", "0");
      }
    }
    pane.addEventListener("wheel", (e) => {
      if (!views.has(svg) || !svg.isConnected) return;
      e.preventDefault();
      zoomAt(svg, Math.exp(-Math.sign(e.deltaY) * Math.min(Math.abs(e.deltaY), 100) * 0.002),
             e.clientX, e.clientY);
    }, { passive: false });
    let drag = null;
    pane.addEventListener("pointerdown", (e) => {
      if (e.button !== 0 || e.target.closest(".ws-lineage-tools")) return;
      const v = views.get(svg);
      drag = { sx: e.clientX, sy: e.clientY, x: v.x, y: v.y, moved: false, id: e.pointerId };
    });
    pane.addEventListener("pointermove", (e) => {
      if (!drag || e.pointerId !== drag.id) return;
      const dx = e.clientX - drag.sx, dy = e.clientY - drag.sy;
      if (!drag.moved && Math.hypot(dx, dy) < 4) return;
      if (!drag.moved) {
        drag.moved = true;
        pane.setPointerCapture(e.pointerId);
        pane.classList.add("ws-dragging");
      }
      const v = views.get(svg);
      v.x = drag.x + dx;
      v.y = drag.y + dy;
      apply(svg);
    });
    const end = (e) => {
      if (!drag || e.pointerId !== drag.id) return;
      if (drag.moved) {  // a drag is not a click on the node where it ends
        pane.dataset.wsDragged = "1";
        setTimeout(() => delete pane.dataset.wsDragged, 0);
      }
      pane.classList.remove("ws-dragging");
      drag = null;
    };
    pane.addEventListener("pointerup", end);
    pane.addEventListener("pointercancel", end);
    first(svg);
  }

  function scan() {
    document.querySelectorAll(".ws-lineage .mermaid svg:not([data-ws-ready])")
      .forEach((svg) => { if (svg.querySelector("g.node, g.root")) setup(svg); });
  }

  document.addEventListener("click", (e) => {
    const node = e.target.closest && e.target.closest(".ws-lineage g.node");
    if (!node) return;
    const pane = node.closest(".ws-lineage-pane");
    if (pane && pane.dataset.wsDragged) return;
    const id = node.dataset.checkpoint || checkpointOf(node);
    if (id) openCheckpoint(id);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !e.target.closest) return;
    const node = e.target.closest(".ws-lineage g.node");
    if (node && node.dataset.checkpoint) openCheckpoint(node.dataset.checkpoint);
  });

  let queued = false;
  const observer = new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; scan(); });
  });
  const start = () => {
    observer.observe(document.body, { childList: true, subtree: true });
    scan();
  };
  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start);
})();
