// mcp-bastion web UI: the little the pages need beyond links and forms (ADR 41).
// Every page works without this file; it loads tools in place, opens the connect dialog,
// switches its tabs and copies snippets.  No inline scripts: the CSP forbids them.
"use strict";

(function () {
  function part(url) {
    return url + (url.indexOf("?") < 0 ? "?" : "&") + "part=1";
  }

  async function fetchPart(url) {
    const resp = await fetch(part(url), { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (resp.status === 401) {
      window.location.assign("/web/login");
      return "";
    }
    return resp.text();
  }

  async function copy(button) {
    const source = document.getElementById(button.dataset.copy);
    if (!source) return;
    const text = source.textContent;
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch (e) {
      const range = document.createRange();
      range.selectNodeContents(source);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      ok = document.execCommand && document.execCommand("copy");
    }
    const label = button.textContent;
    button.textContent = ok ? "Copied" : "Press Ctrl+C";
    button.setAttribute("aria-live", "polite");
    setTimeout(function () { button.textContent = label; }, 1500);
  }

  async function toggleTools(link) {
    const box = link.closest(".app").querySelector(".tools");
    if (!box.hidden) {
      box.hidden = true;
      link.setAttribute("aria-expanded", "false");
      return;
    }
    box.innerHTML = "<p class=\"hint\">Loading tools…</p>";
    box.hidden = false;
    link.setAttribute("aria-expanded", "true");
    box.innerHTML = await fetchPart(link.getAttribute("href"));
  }

  function selectTab(tab, focus) {
    const list = tab.closest("[role=tablist]");
    const scope = list.parentElement;
    list.querySelectorAll("[role=tab]").forEach(function (t) {
      const on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      t.tabIndex = on ? 0 : -1;
      const pane = scope.querySelector("#" + t.getAttribute("aria-controls"));
      if (pane) pane.hidden = !on;
    });
    if (focus) tab.focus();
  }

  async function openConnect(link) {
    const dialog = document.getElementById("connect");
    if (!dialog || typeof dialog.showModal !== "function") {
      window.location.assign(link.getAttribute("href"));
      return;
    }
    const body = dialog.querySelector(".dialog-body");
    body.innerHTML = await fetchPart(link.getAttribute("href"));
    dialog.showModal();
    const first = dialog.querySelector("[role=tab]");
    if (first) first.focus();
  }

  document.addEventListener("click", function (e) {
    const target = e.target instanceof Element ? e.target : null;
    if (!target) return;
    const copyButton = target.closest("button.copy");
    if (copyButton) {
      e.preventDefault();
      copy(copyButton);
      return;
    }
    const tab = target.closest("[role=tab]");
    if (tab) {
      selectTab(tab, false);
      return;
    }
    const tools = target.closest("a[data-tools]");
    if (tools) {
      e.preventDefault();
      toggleTools(tools);
      return;
    }
    const connect = target.closest("a[data-connect]");
    if (connect) {
      e.preventDefault();
      openConnect(connect);
    }
  });

  // The audit page's live tail: the feed in commit order, newest rows on top.
  let tailing = false;

  function eventRow(e) {
    const tr = document.createElement("tr");
    tr.className = (e.ok ? "ok" : "bad") + " new";
    [e.time, e.event, e.user, e.app, e.tool, e.ok ? "success" : "failure", e.details].forEach(function (text) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    });
    if (e.session) {
      const a = document.createElement("a");
      a.href = "/web/audit/session/" + encodeURIComponent(e.session);
      a.textContent = "session";
      tr.lastChild.append(" ", a);
    }
    return tr;
  }

  async function tail(button) {
    const body = document.getElementById("events");
    let cursor = "";
    while (tailing) {
      const url = button.dataset.feed + "?cursor=" + encodeURIComponent(cursor);
      let page;
      try {
        const resp = await fetch(url, { credentials: "same-origin" });
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        page = await resp.json();
      } catch (err) {
        button.textContent = "Live tail (stopped: " + err.message + ")";
        tailing = false;
        button.setAttribute("aria-pressed", "false");
        return;
      }
      cursor = page.cursor;
      page.events.forEach(function (e) {
        if (tailing) body.insertBefore(eventRow(e), body.firstChild);
      });
      if (!page.more) {
        // Caught up: look again in a second (as `bastion audit tail -f` does, every 0.5 s).
        await new Promise(function (resolve) { setTimeout(resolve, 1000); });
      }
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    const button = document.getElementById("tail");
    if (!button) return;
    button.addEventListener("click", function () {
      tailing = !tailing;
      button.setAttribute("aria-pressed", tailing ? "true" : "false");
      button.textContent = tailing ? "Live tail (on)" : "Live tail";
      if (tailing) tail(button);
    });
  });

  // Arrow keys move between tabs, as the ARIA tabs pattern says.
  document.addEventListener("keydown", function (e) {
    const tab = e.target instanceof Element ? e.target.closest("[role=tab]") : null;
    if (!tab || (e.key !== "ArrowRight" && e.key !== "ArrowLeft")) return;
    const tabs = Array.from(tab.closest("[role=tablist]").querySelectorAll("[role=tab]"));
    const i = tabs.indexOf(tab) + (e.key === "ArrowRight" ? 1 : -1);
    selectTab(tabs[(i + tabs.length) % tabs.length], true);
    e.preventDefault();
  });
})();
