// Keel Console: the pages over the HTTP API (docs/console.md). No framework and no build
// step: the DOM is built with textContent only, since every name, value and event comes
// from a device and may be hostile.
"use strict";

const CSRF = document.querySelector('meta[name="csrf"]').content;
const view = document.getElementById("view");
const liveBadge = document.getElementById("live");
const EVENTS_SHOWN = 500;

// ---- helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: {} };
  if (options.body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = CSRF;
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch("/api/" + path, init);
  if (response.status === 401) {
    location.assign("/login");
    throw new Error("signed out");
  }
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

const enc = encodeURIComponent;

function when(ts) {
  if (!ts) return "never";
  const seconds = Math.max(0, Date.now() / 1000 - ts);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return new Date(ts * 1000).toLocaleString();
}

function stamp(value) {  // seconds since the epoch, or ISO 8601 text
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return isNaN(date) ? String(value ?? "—") : date.toLocaleString();
}

function onlineBadge(online) {
  return el("span", { class: "badge " + (online ? "online" : "offline") }, online ? "online" : "offline");
}

function modeBadge(mode, reason) {
  if (mode === "safe") return el("span", { class: "badge safe", title: "safe mode" }, `safe mode: ${reason || "?"}`);
  return el("span", { class: "badge" }, mode || "unknown");
}

function deps(list) {
  return (list || []).map((d) => `${d.function} ${d.index} ≥ ${d.version}`).join(", ") || "—";
}

function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error("cannot read the file"));
    reader.readAsDataURL(file);
  });
}

function table(headers, rows, options = {}) {
  const head = el("tr", {}, headers.map((h, i) => {
    const sortable = options.onSort !== undefined;
    const cls = [sortable ? "sortable" : "", options.sortIndex === i ? "sorted" : "",
                 options.sortIndex === i && options.ascending === false ? "up" : ""].join(" ").trim();
    return el("th", { class: cls || null, onclick: sortable ? () => options.onSort(i) : null }, h);
  }));
  return el("table", { class: options.class || null, id: options.id || null },
            el("thead", {}, head), el("tbody", {}, rows));
}

// ---- the live stream (server-sent events) ---------------------------------------------

let stream = null;
const handlers = { devices: null, device: null, events: [] };

function openStream(deviceName) {
  if (stream) stream.close();
  stream = new EventSource("/api/stream" + (deviceName ? "?device=" + enc(deviceName) : ""));
  stream.onopen = () => { liveBadge.textContent = "live"; liveBadge.classList.add("on"); };
  stream.onerror = () => { liveBadge.textContent = "reconnecting…"; liveBadge.classList.remove("on"); };
  stream.addEventListener("devices", (e) => handlers.devices && handlers.devices(JSON.parse(e.data)));
  stream.addEventListener("device", (e) => handlers.device && handlers.device(JSON.parse(e.data)));
  stream.addEventListener("events", (e) => {
    const events = JSON.parse(e.data);
    handlers.events.forEach((h) => h(events));
  });
}

// ---- pages ----------------------------------------------------------------------------

const devicesState = { filter: "", sort: 0, ascending: true, rows: [] };

function devicesPage() {
  const filter = el("input", { type: "search", placeholder: "filter: name, platform, fleet, mode…",
                               value: devicesState.filter, id: "device-filter" });
  const holder = el("div", { id: "devices" }, el("p", { class: "note" }, "loading…"));
  filter.addEventListener("input", () => { devicesState.filter = filter.value; draw(); });
  const columns = ["Name", "Online", "Mode", "Platform", "System", "App", "Fleet", "Last seen"];
  const keys = [(d) => d.name, (d) => (d.online ? 0 : 1), (d) => d.mode || "", (d) => d.platform || "",
                (d) => d.system_version || "", (d) => d.app_version || "", (d) => d.fleet || "",
                (d) => -(d.last_seen || 0)];

  function draw() {
    const words = devicesState.filter.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = devicesState.rows.filter((d) => {
      const text = [d.name, d.id, d.platform, d.fleet, d.mode, d.online ? "online" : "offline",
                    d.safe_mode_reason].join(" ").toLowerCase();
      return words.every((w) => text.includes(w));
    });
    const key = keys[devicesState.sort];
    shown.sort((a, b) => {
      const x = key(a), y = key(b);
      const order = x < y ? -1 : x > y ? 1 : 0;
      return devicesState.ascending ? order : -order;
    });
    const rows = shown.map((d) => el("tr", { "data-device": d.name },
      el("td", {}, el("a", { href: "#/devices/" + enc(d.name) }, d.name)),
      el("td", {}, onlineBadge(d.online)),
      el("td", {}, modeBadge(d.mode, d.safe_mode_reason)),
      el("td", {}, d.platform || "—"), el("td", {}, d.system_version || "—"),
      el("td", {}, d.app_version || "—"), el("td", {}, d.fleet || "—"),
      el("td", { title: d.last_seen ? new Date(d.last_seen * 1000).toISOString() : "" }, when(d.last_seen))));
    holder.replaceChildren(
      el("p", { class: "note" }, `${shown.length} of ${devicesState.rows.length} devices, ` +
         `${devicesState.rows.filter((d) => d.online).length} online`),
      table(columns, rows, { id: "device-table", sortIndex: devicesState.sort, ascending: devicesState.ascending,
        onSort: (i) => {
          devicesState.ascending = devicesState.sort === i ? !devicesState.ascending : true;
          devicesState.sort = i;
          draw();
        } }));
  }

  handlers.devices = (rows) => { devicesState.rows = rows; draw(); };
  openStream(null);
  api("devices").then(handlers.devices).catch((e) => holder.replaceChildren(el("p", { class: "error" }, e.message)));
  return [el("h1", {}, "Devices"), el("div", { class: "toolbar" }, filter), holder];
}

function devicePage(name) {
  const top = el("div", { id: "device" }, el("p", { class: "note" }, "loading…"));
  const eventRows = el("tbody");
  // What the user types or chooses, and what came back, survive a redraw (the stream
  // redraws the page whenever the device changes): those nodes are made once.
  const kept = {};
  const keep = (key, make) => kept[key] || (kept[key] = make());
  let current = null;

  function healPanel(heal) {
    const parts = [el("dt", {}, "Healer"), el("dd", { id: "heal-state" }, heal.state + (heal.reason ? `: ${heal.reason}` : ""))];
    if (heal.plan && heal.plan.length) parts.push(el("dt", {}, "Plan"), el("dd", {}, heal.plan.join(" → ")));
    if (heal.sending) {
      const s = heal.sending;
      parts.push(el("dt", {}, "Sending"), el("dd", {}, `${s.module} `,
        el("progress", { id: "heal-progress", max: s.size || 1, value: s.acknowledged || 0 }),
        ` ${s.acknowledged || 0} / ${s.size || "?"} bytes`));
    }
    if (heal.instance) parts.push(el("dt", {}, "Instance"), el("dd", {}, heal.instance));
    return parts;
  }

  function draw(d) {
    current = d;
    if (!d) {
      top.replaceChildren(el("p", { class: "error" }, `no device '${name}'`));
      return;
    }
    const sections = [];
    sections.push(el("h1", {}, d.name, " ", onlineBadge(d.online), " ", modeBadge(d.mode, d.safe_mode_reason)));
    if (d.mode === "safe") {
      sections.push(el("div", { class: "alert", id: "safe-mode" },
        `Safe mode: ${d.safe_mode_reason || "unknown reason"}.`,
        d.missing && d.missing.length ? ` The app needs ${deps(d.missing)}.` : ""));
    }
    sections.push(el("dl", { class: "facts" },
      el("dt", {}, "Id"), el("dd", {}, d.id),
      el("dt", {}, "Platform"), el("dd", {}, d.platform || "—"),
      el("dt", {}, "System"), el("dd", {}, d.system_version || "—"),
      el("dt", {}, "App"), el("dd", {}, d.app || "—"),
      el("dt", {}, "Missing"), el("dd", { id: "missing" }, deps(d.missing)),
      el("dt", {}, "Fleet"), el("dd", {}, d.fleet || "—"),
      el("dt", {}, "Reset reason"), el("dd", {}, d.reset_reason || "—"),
      el("dt", {}, "VM"), el("dd", {}, d.vm ? `${d.vm.name || ""} ${d.vm.version || ""}` : "—"),
      el("dt", {}, "Last seen"), el("dd", {}, when(d.last_seen)),
      healPanel(d.heal || { state: "idle" }),
      d.dropped && d.dropped.count ? [el("dt", {}, "Dropped"), el("dd", {}, `${d.dropped.count} (${d.dropped.reason})`)] : []));

    sections.push(el("h2", {}, "Modules"), table(
      ["Function", "Index", "Version", "Dependencies", "Valid", "Reason"],
      (d.modules || []).map((m) => el("tr", {},
        el("td", {}, m.function), el("td", { class: "num" }, m.index), el("td", {}, m.version),
        el("td", {}, deps(m.dependencies)),
        el("td", { class: m.valid === false ? "invalid" : "" }, m.valid === false ? "no" : "yes"),
        el("td", {}, m.invalid_reason || (m.valid === false ? "invalid" : "")))), { id: "modules" }));

    if (d.rollbacks && d.rollbacks.length) {
      sections.push(el("h2", {}, "Rollbacks"), table(["Module", "Version", "Restored", "Reason", "When"],
        d.rollbacks.map((r) => el("tr", {}, el("td", {}, `${r.function} ${r.index}`), el("td", {}, r.version),
          el("td", {}, r.restored || "—"), el("td", {}, r.reason || "—"), el("td", {}, when(r.ts))))));
    }
    if (d.network) {
      const n = d.network;
      sections.push(el("h2", {}, "Network"), el("dl", { class: "facts" },
        ["kind", "state", "ssid", "rssi", "ip", "connects", "error"].filter((k) => n[k] !== undefined && n[k] !== null)
          .map((k) => [el("dt", {}, k), el("dd", {}, String(n[k]))])));
    }

    sections.push(el("h2", {}, "Variables"));
    sections.push(d.variables && d.variables.length ? el("div", { class: "panel", id: "variables" },
      d.variables.map((v) => keep("var:" + v, () => {
        const out = el("span", { class: "result" });
        return el("div", { class: "row" }, el("b", {}, v),
          el("button", { "data-variable": v, onclick: () => {
            out.textContent = "…";
            api(`devices/${enc(name)}/variables/${enc(v)}`)
              .then((r) => { out.className = "result"; out.textContent = JSON.stringify(r.value); })
              .catch((e) => { out.className = "result error"; out.textContent = e.message; });
          } }, "Read"), out);
      }))) : el("p", { class: "note" }, "none"));

    sections.push(el("h2", {}, "Functions"));
    sections.push(d.functions && d.functions.length ? el("div", { class: "panel", id: "functions" },
      d.functions.map((f) => keep("fn:" + f, () => {
        const out = el("span", { class: "result" });
        const arg = el("input", { placeholder: "argument", "data-argument": f });
        return el("div", { class: "row" }, el("b", {}, f), arg,
          el("button", { "data-function": f, onclick: () => {
            out.textContent = "…";
            api(`devices/${enc(name)}/functions/${enc(f)}`, { body: { arg: arg.value } })
              .then((r) => { out.className = "result"; out.textContent = JSON.stringify(r.result); })
              .catch((e) => { out.className = "result error"; out.textContent = e.message; });
          } }, "Call"), out);
      }))) : el("p", { class: "note" }, "none"));

    sections.push(el("h2", {}, "Flash an app"), keep("flash", flashForm));
    sections.push(el("h2", {}, "Events"), table(["Time", "Name", "Data"], [], { class: "events", id: "device-events" }));
    top.replaceChildren(...sections);
    top.querySelector("#device-events tbody").replaceWith(eventRows);
  }

  const flash = { file: null, message: el("p", { id: "flash-result" }), progress: null };
  function flashForm() {
    const input = el("input", { type: "file", accept: ".bin", id: "flash-file",
                                onchange: () => { flash.file = input.files[0] || null; } });
    const button = el("button", { class: "primary", id: "flash-send", onclick: async () => {
      if (!flash.file) { flash.message.className = "error"; flash.message.textContent = "choose a .bin file"; return; }
      const file = flash.file;
      flash.message.className = "note";
      flash.message.textContent = `sending ${file.name}…`;
      try {
        const started = await api(`devices/${enc(name)}/flash`, { body: { image: await fileBase64(file) } });
        watchTransfer(file.name, started.transfer);
      } catch (e) {
        flash.message.className = "error";
        flash.message.textContent = `${file.name}: ${e.message}`;
      }
    } }, "Send");
    return el("div", { class: "panel" }, el("div", { class: "row" }, input, button), flash.message);
  }

  async function watchTransfer(fileName, id) {
    // An update's own progress (the device's acknowledgements), until it ends.
    for (;;) {
      let t;
      try { t = await api(`transfers/${enc(id)}`); } catch (e) { flash.message.textContent = e.message; return; }
      if (t.state === "sending") {
        flash.message.className = "note";
        flash.message.replaceChildren(`${fileName}: `, el("progress", { max: t.size, value: t.acknowledged }),
                                      ` ${t.acknowledged} / ${t.size} bytes`);
        await new Promise((r) => setTimeout(r, 500));
        continue;
      }
      flash.message.className = t.state === "pending" ? "ok" : "error";
      flash.message.textContent = t.state === "pending"
        ? `${fileName}: sent (${t.size} bytes); the device installs it at its reset`
        : `${fileName}: the update failed: ${t.error}`;
      return;
    }
  }

  function addEvents(events) {
    for (const e of events) {
      if (current && e.id !== current.id) continue;
      eventRows.prepend(el("tr", {}, el("td", {}, new Date(e.ts * 1000).toLocaleTimeString()),
                             el("td", {}, e.name), el("td", {}, e.data ?? "")));
    }
    while (eventRows.children.length > EVENTS_SHOWN) eventRows.lastChild.remove();
  }

  handlers.device = draw;
  handlers.events.push(addEvents);
  openStream(name);
  api(`devices/${enc(name)}`).then(draw).catch((e) => top.replaceChildren(el("p", { class: "error" }, e.message)));
  return [el("p", {}, el("a", { href: "#/devices" }, "← Devices")), top];
}

function eventsPage() {
  const deviceFilter = el("input", { type: "search", placeholder: "device", id: "event-device" });
  const nameFilter = el("input", { type: "search", placeholder: "event name", id: "event-name" });
  const rows = el("tbody");
  const all = [];
  function matches(e) {
    const dv = deviceFilter.value.trim().toLowerCase(), nv = nameFilter.value.trim().toLowerCase();
    return (!dv || e.device.toLowerCase().includes(dv) || e.id.includes(dv)) && (!nv || e.name.toLowerCase().includes(nv));
  }
  function row(e) {
    return el("tr", { "data-seq": e.seq }, el("td", {}, new Date(e.ts * 1000).toLocaleTimeString()),
              el("td", {}, el("a", { href: "#/devices/" + enc(e.device) }, e.device)),
              el("td", {}, e.name), el("td", {}, e.data ?? ""));
  }
  function redraw() { rows.replaceChildren(...all.filter(matches).slice(0, EVENTS_SHOWN).map(row)); }
  function add(events) {
    for (const e of events) {
      all.unshift(e);
      if (matches(e)) rows.prepend(row(e));
    }
    all.splice(EVENTS_SHOWN * 4);
    while (rows.children.length > EVENTS_SHOWN) rows.lastChild.remove();
  }
  deviceFilter.addEventListener("input", redraw);
  nameFilter.addEventListener("input", redraw);
  handlers.events.push(add);
  openStream(null);
  // The last events before now, then the stream's.
  api("events?after=-1").then((r) => api(`events?after=${Math.max(0, r.last - 200)}`))
    .then((r) => add(r.events)).catch(() => {});
  return [el("h1", {}, "Events"), el("div", { class: "toolbar" }, deviceFilter, nameFilter),
          table(["Time", "Device", "Name", "Data"], [], { class: "events", id: "event-table" })]
    .map((n) => { if (n.id === "event-table") n.querySelector("tbody").replaceWith(rows); return n; });
}

function releasesPage() {
  const holder = el("div", {}, el("p", { class: "note" }, "loading…"));
  api("releases").then((releases) => {
    const platforms = [...new Set(releases.map((r) => r.platform))].sort();
    if (!platforms.length) {
      holder.replaceChildren(el("p", { class: "note" }, "No system releases yet: keel release system DIR."));
      return;
    }
    holder.replaceChildren(...platforms.map((p) => el("section", { "data-platform": p },
      el("h2", {}, p),
      table(["Version", "", "Released", "Modules"], releases.filter((r) => r.platform === p).map((r) =>
        el("tr", {}, el("td", {}, r.version),
           el("td", {}, r.prerelease ? el("span", { class: "badge pre" }, "prerelease") : ""),
           el("td", {}, r.released.slice(0, 10)),
           el("td", {}, r.modules.map((m) => el("div", {}, `${m.function} ${m.index} ${m.version} · ${m.size} bytes · ${m.sha256.slice(0, 12)}`)))))))));
  }).catch((e) => holder.replaceChildren(el("p", { class: "error" }, e.message)));
  return [el("h1", {}, "Releases"), holder];
}

function fleetsPage() {
  const holder = el("div", {}, el("p", { class: "note" }, "loading…"));
  api("fleets").then((fleets) => {
    holder.replaceChildren(fleets.length ? table(["Fleet", "Platform", "Devices", "Release", "Signed by"],
      fleets.map((f) => el("tr", {}, el("td", {}, el("a", { href: "#/fleets/" + enc(f.name) }, f.name)),
        el("td", {}, f.platform), el("td", { class: "num" }, f.members),
        el("td", {}, f.release ? `#${f.release.number}: app ${f.release.version}` : "none"),
        el("td", {}, f.signed_by.length ? f.signed_by.map((k) => k.slice(0, 16)).join(", ") : "unsigned ok"))))
      : el("p", { class: "note" }, "No fleets yet: keel fleet create NAME --platform P."));
  }).catch((e) => holder.replaceChildren(el("p", { class: "error" }, e.message)));
  return [el("h1", {}, "Fleets"), holder];
}

function fleetPage(name) {
  const holder = el("div", {}, el("p", { class: "note" }, "loading…"));
  const message = el("p", { id: "release-result" });
  const file = el("input", { type: "file", accept: ".bin", id: "release-file" });
  const pre = el("input", { type: "checkbox", id: "release-prerelease" });
  const form = el("div", { class: "panel" },
    el("div", { class: "row" }, file,
       el("label", {}, pre, " allow prerelease system versions"),
       el("button", { class: "primary", id: "release-send", onclick: async () => {
         const chosen = file.files[0];
         if (!chosen) { message.className = "error"; message.textContent = "choose an app .bin"; return; }
         message.className = "note";
         message.textContent = `releasing ${chosen.name}…`;
         try {
           const r = await api(`fleets/${enc(name)}/releases`,
                               { body: { image: await fileBase64(chosen), allow_prerelease: pre.checked } });
           message.className = "ok";
           message.textContent = r.already ? `${chosen.name} is already release ${r.number}`
             : `released app ${r.version} as release ${r.number} (needs ${deps(r.dependencies)})`;
           load();
         } catch (e) {
           message.className = "error";
           message.textContent = `${chosen.name}: ${e.message}`;
         }
       } }, "Release")), message,
    el("p", { class: "note" }, "Prerelease system versions reach the fleet only when allowed here."));

  function draw(f) {
    const rel = f.release;
    holder.replaceChildren(
      el("dl", { class: "facts" }, el("dt", {}, "Platform"), el("dd", {}, f.platform),
         el("dt", {}, "Release"), el("dd", { id: "fleet-release" }, rel ? `#${rel.number}: app ${rel.version} (needs ${deps(rel.dependencies)})${rel.allow_prerelease ? ", prereleases allowed" : ""}` : "none"),
         el("dt", {}, "Signed by"), el("dd", {}, f.signed_by.length ? f.signed_by.join(", ") : "unsigned modules taken")),
      el("h2", {}, "Devices"),
      table(["Name", "Online", "App", "System", "State", "Reason"], f.devices.map((d) => el("tr", {},
        el("td", {}, el("a", { href: "#/devices/" + enc(d.name) }, d.name)), el("td", {}, onlineBadge(d.online)),
        el("td", {}, d.app_version || "—"), el("td", {}, d.system_version || "—"),
        el("td", {}, d.state, d.sending ? [" ", el("progress", { max: d.sending.size || 1, value: d.sending.acknowledged || 0 })] : ""),
        el("td", {}, d.reason || ""))), { id: "fleet-devices" }),
      el("h2", {}, "Release an app"), form,
      el("h2", {}, "History"),
      table(["#", "App", "Needs", "Prereleases", "Released"], f.releases.map((r) => el("tr", {},
        el("td", {}, r.number), el("td", {}, r.version), el("td", {}, deps(r.dependencies)),
        el("td", {}, r.allow_prerelease ? "allowed" : "no"),
        el("td", {}, stamp(r.released))))));
  }
  function load() { api(`fleets/${enc(name)}`).then(draw).catch((e) => holder.replaceChildren(el("p", { class: "error" }, e.message))); }
  handlers.devices = load;  // a member changed: look again
  openStream(null);
  load();
  return [el("p", {}, el("a", { href: "#/fleets" }, "← Fleets")), el("h1", {}, `Fleet ${name}`), holder];
}

// ---- routing --------------------------------------------------------------------------

function route() {
  const [page, arg] = location.hash.replace(/^#\/?/, "").split("/").map((p) => decodeURIComponent(p || ""));
  handlers.devices = null;
  handlers.device = null;
  handlers.events = [];
  const pages = { devices: () => (arg ? devicePage(arg) : devicesPage()), events: eventsPage,
                  releases: releasesPage, fleets: () => (arg ? fleetPage(arg) : fleetsPage()) };
  const current = pages[page] ? page : "devices";
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("current", a.dataset.page === current));
  view.replaceChildren(...pages[current]());
}

window.addEventListener("hashchange", route);
route();
