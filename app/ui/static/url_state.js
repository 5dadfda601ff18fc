// The workbench's state in the address bar: ?tab=ID&job=ID&ck=ID&ds=ID.
// The server restores them when a page loads (app.ui.navigation.restore); this script keeps
// the address bar in step with what the page shows, marks the current tab in the navigation
// bar, and opens in-app links (href="?tab=...") without a reload: window.wsOpen({tab, job,
// ck, ds}) clicks the navigation button and fills the selected-job / -checkpoint / -dataset
// boxes, whose change handlers load the job, checkpoint or dataset. It reads nothing from the
// server.
(function () {
  "use strict";
  var BOXES = { job: "selected-job", ck: "selected-checkpoint", ds: "selected-dataset" };
  var initial = new URLSearchParams(window.location.search);
  var started = Date.now();
  var settled = false;

  function box(name) {
    var root = document.getElementById(BOXES[name]);
    return root ? root.querySelector("textarea, input") : null;
  }

  function currentTab() {
    var items = document.querySelectorAll("#ws-tabs .tabitem[id^='tab-']");
    for (var i = 0; i < items.length; i++) {
      if (window.getComputedStyle(items[i]).display !== "none") {
        return items[i].id.slice(4);
      }
    }
    return null;
  }

  function setBox(el, value) {
    var proto = el.tagName === "TEXTAREA" ? HTMLTextAreaElement.prototype
                                          : HTMLInputElement.prototype;
    Object.getOwnPropertyDescriptor(proto, "value").set.call(el, value);
    el.dispatchEvent(new Event("input", { bubbles: true }));
    el.dispatchEvent(new Event("change", { bubbles: true }));
  }

  // Until the page shows what the address asked for (the server's restore), the address is
  // left as it is, or the first tick would erase ?job= before the Jobs box is filled.
  function pageMatchesAddress() {
    if (initial.get("tab") && currentTab() !== initial.get("tab")) return false;
    for (var name in BOXES) {
      var want = initial.get(name);
      var el = box(name);
      if (want && el && el.value.trim() !== want) return false;
    }
    return true;
  }

  function sync() {
    var tab = currentTab();
    var nav = document.querySelectorAll(".ws-nav-btn");
    for (var i = 0; i < nav.length; i++) {
      nav[i].classList.toggle("ws-nav-on", tab !== null && nav[i].id === "nav-" + tab);
    }
    if (!settled) {
      settled = pageMatchesAddress() || Date.now() - started > 10000;
      if (!settled) return;
    }
    var params = new URLSearchParams(window.location.search);
    var changed = false;
    if (tab && params.get("tab") !== tab) {
      params.set("tab", tab);
      changed = true;
    }
    for (var name in BOXES) {
      var el = box(name);
      if (!el) continue;  // its tab has not been opened yet: keep what the address says
      var value = el.value.trim();
      if ((params.get(name) || "") !== value) {
        if (value) params.set(name, value); else params.delete(name);
        changed = true;
      }
    }
    if (changed) {
      window.history.replaceState(null, "", "?" + params.toString() + window.location.hash);
    }
  }

  window.wsOpen = function (want) {
    if (want.tab) {
      var button = document.getElementById("nav-" + want.tab);
      if (button) button.click();
    }
    // A tab's boxes exist once the tab was opened, and a box that has just appeared may
    // still take its first value from the page's state, undoing ours: set each box until it
    // has kept the wanted value for a few checks in a row (or 15 s pass).
    var tries = 0, steady = 0;
    (function fill() {
      var done = true;
      for (var name in BOXES) {
        if (!want[name]) continue;
        var el = box(name);
        if (!el || !el.offsetParent) { done = false; continue; }
        if (el.value.trim() !== want[name]) { setBox(el, want[name]); done = false; }
      }
      steady = done ? steady + 1 : 0;
      if (steady < 4 && tries++ < 100) window.setTimeout(fill, 150);
    })();
  };

  // in-app links: "?tab=jobs&job=job-1234" opens the job in this page
  document.addEventListener("click", function (event) {
    var link = event.target && event.target.closest ? event.target.closest("a[href^='?']")
                                                    : null;
    if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) {
      return;
    }
    var query = new URLSearchParams(link.getAttribute("href").slice(1));
    if (!query.get("tab")) return;
    event.preventDefault();
    event.stopPropagation();
    var want = {};
    query.forEach(function (value, key) { want[key] = value; });
    window.wsOpen(want);
  }, true);

  window.setInterval(sync, 400);
})();
