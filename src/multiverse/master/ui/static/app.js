// The Multiverse dashboard: plain ES modules over the public REST and WebSocket API.
// The API token lives in sessionStorage (this tab, until it closes), never in a URL.
// Every element is built with h() (textContent, never innerHTML), so no API value is markup.
import { FitAddon } from "/ui/static/vendor/addon-fit.js";
import { Terminal } from "/ui/static/vendor/xterm.js";

const TOKEN = "multiverse.token";
const ROLE = "multiverse.role";
const WS_PROTOCOL = "multiverse.v1";
const WS_BEARER = "bearer.multiverse.";
const MAX_EVENTS = 50;
const DEFAULT_IMAGE = "tiny"; // the API's default, as `multiverse launch` without --image

const view = document.getElementById("view");
const state = { events: [], eventSocket: null, listeners: new Set(), cleanup: [] };

// ---- small helpers ----

function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else if (key === "class") element.className = value;
    else element.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

const isAdmin = () => sessionStorage.getItem(ROLE) === "admin";
const link = (path, text) => h("a", { href: `/ui/${path}` }, text);
const nodeLink = (name) => (name ? link(`nodes/${encodeURIComponent(name)}`, name) : "—");
const instanceLink = (name) => link(`instances/${encodeURIComponent(name)}`, name);

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n >= 10 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

const plural = (count, word) => (count === 1 ? word : `${word}s`);
const badge = (text) => h("span", { class: `badge s-${String(text).toLowerCase()}` }, text);

const cores = (n) => String(Number(n.toFixed(1)));
const percent = (part, total) => (total > 0 ? Math.min(100, Math.round((part / total) * 100)) : 0);

// Two meters per resource: what instances have reserved (allocated) and what the host measured
// it uses; either can be the larger (idle VMs; the host's own load), so neither stacks on the other.
function bar(label, allocated, used, total, format = cores) {
  const cap = total || 1;
  return h(
    "div",
    { class: "bar" },
    h("span", { class: "bar-label" }, label),
    h(
      "div",
      { class: "meters" },
      h("progress", { class: "allocated", max: cap, value: Math.min(allocated, cap),
        "aria-label": `${label} allocated ${percent(allocated, total)}%` }),
      h("progress", { class: "used", max: cap, value: Math.min(used, cap),
        "aria-label": `${label} used ${percent(used, total)}%` }),
    ),
    h(
      "span",
      { class: "bar-text" },
      `${format(allocated)} of ${format(total)} allocated · `,
      h("span", { class: "bar-used" }, `${format(used)} used`),
    ),
  );
}

// Each resource's bar for one node (or, summed, for the cluster).
const bars = (node) => [
  bar("CPU", node.cpus.total - node.cpus.free, node.used.cpus, node.cpus.total),
  bar("Memory", node.memory.total - node.memory.free, node.used.memory, node.memory.total, bytes),
  bar("Disk", node.disk.total - node.disk.free, node.used.disk, node.disk.total, bytes),
];

function toast(message, kind = "info") {
  const box = document.getElementById("toast");
  box.className = `toast-${kind}`;
  box.textContent = message;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => {
    box.textContent = "";
    box.className = "";
  }, 6000);
}

function table(headers, rows, empty = "None.") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      {},
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          headers.map((text) => h("th", { scope: "col" }, text)),
        ),
      ),
      h(
        "tbody",
        {},
        rows.map((cells) =>
          h(
            "tr",
            {},
            cells.map((cell) => h("td", {}, cell)),
          ),
        ),
      ),
    ),
  );
}

const dl = (pairs) =>
  h(
    "dl",
    { class: "facts" },
    pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")]),
  );

// ---- the API ----

class ApiError extends Error {
  constructor(status, code, message, reasons = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.reasons = reasons; // an unschedulable launch: why each node refused, [{node, reason}]
  }
}

async function send(method, url, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN) || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    if (response.status === 401 && !url.endsWith("/whoami")) logout("Your token is no longer valid.");
    throw new ApiError(
      response.status,
      error.code || "http_error",
      error.message || response.statusText,
      error.reasons || [],
    );
  }
  return { data, response };
}

async function api(method, path, body) {
  return (await send(method, `/api/v1/${path}`, body)).data;
}

async function list(path) {
  // Every page of a listing: the API gives at most 1000 items a page and links the next.
  const items = [];
  let url = `/api/v1/${path}${path.includes("?") ? "&" : "?"}limit=1000`;
  while (url) {
    const { data, response } = await send("GET", url);
    items.push(...data);
    url = /<([^>]+)>;\s*rel="next"/.exec(response.headers.get("Link") || "")?.[1];
  }
  return items;
}

function socket(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const token = sessionStorage.getItem(TOKEN) || "";
  const ws = new WebSocket(`${scheme}//${location.host}/api/v1/${path}`, [WS_PROTOCOL, WS_BEARER + token]);
  ws.binaryType = "arraybuffer";
  return ws;
}

// ---- the events stream: one per tab, pages subscribe while they are shown ----

function connectEvents() {
  if (state.eventSocket || !sessionStorage.getItem(TOKEN)) return;
  const ws = socket("events");
  state.eventSocket = ws;
  ws.onmessage = (message) => {
    const event = JSON.parse(message.data);
    state.events.unshift(event);
    state.events.length = Math.min(state.events.length, MAX_EVENTS);
    for (const listener of state.listeners) listener(event);
  };
  ws.onclose = () => {
    state.eventSocket = null;
    if (sessionStorage.getItem(TOKEN)) setTimeout(connectEvents, 2000); // the master may be back
  };
}

function onEvents(listener) {
  // Events come in bursts (a launch makes several); one refresh per burst is enough.
  let timer = null;
  const debounced = (event) => {
    clearTimeout(timer);
    timer = setTimeout(() => listener(event), 150);
  };
  state.listeners.add(debounced);
  state.cleanup.push(() => {
    clearTimeout(timer);
    state.listeners.delete(debounced);
  });
}

function describe(event) {
  if (event.type === "instance") return `${event.name}: ${event.old || "new"} → ${event.state}`;
  if (event.type === "node")
    return `node ${event.name}: ${event.status}${event.cordoned ? " (cordoned)" : ""}`;
  if (event.type === "operation") {
    return `${event.action} ${event.target}: ${event.status}${event.error ? ` (${event.error})` : ""}`;
  }
  if (event.type === "fault") {
    return `fault ${event.fault.id} ${event.action}: ${event.fault.kind} ${faultTargets(event.fault)}`;
  }
  return JSON.stringify(event);
}

function eventList() {
  const list = h("ol", { class: "events", "aria-live": "polite" });
  const fill = () =>
    list.replaceChildren(
      ...(state.events.length
        ? state.events
            .slice(0, 20)
            .map((event) =>
              h(
                "li",
                {},
                h("time", { datetime: event.time }, event.time.slice(11, 19)),
                " ",
                describe(event),
              ),
            )
        : [h("li", { class: "muted" }, "No events since this page opened.")]),
    );
  fill();
  state.listeners.add(fill);
  state.cleanup.push(() => state.listeners.delete(fill));
  return list;
}

// ---- actions with confirmation ----

function actionButton(label, run, { confirmText = "", danger = false } = {}) {
  return h(
    "button",
    {
      type: "button",
      class: danger ? "danger" : "",
      onclick: async (click) => {
        if (confirmText && !window.confirm(confirmText)) return;
        const button = click.currentTarget;
        button.disabled = true;
        try {
          await run();
          toast(`${label}: done`);
        } catch (error) {
          toast(`${label}: ${error.message}`, "error");
        } finally {
          button.disabled = false;
        }
      },
    },
    label,
  );
}

// ---- pages ----

async function overview() {
  const [nodes, instances] = await Promise.all([list("nodes"), list("instances")]);
  const sum = (key, part) => nodes.reduce((total, node) => total + node[key][part], 0);
  const cluster = Object.fromEntries(
    ["cpus", "memory", "disk"].map((key) => [key, { total: sum(key, "total"), free: sum(key, "free") }]),
  );
  cluster.used = { cpus: sum("used", "cpus"), memory: sum("used", "memory"), disk: sum("used", "disk") };
  const byState = {};
  for (const instance of instances) byState[instance.state] = (byState[instance.state] || 0) + 1;
  const ready = nodes.filter((node) => node.status === "Ready").length;
  return [
    h("h1", {}, "Overview"),
    h(
      "section",
      { "aria-labelledby": "totals-h" },
      h("h2", { id: "totals-h" }, "Cluster"),
      h(
        "div",
        { class: "totals" },
        h(
          "div",
          { class: "total" },
          h("strong", { id: "total-nodes" }, `${ready}/${nodes.length}`),
          " nodes ready",
        ),
        h(
          "div",
          { class: "total" },
          h("strong", { id: "total-instances" }, instances.length),
          plural(instances.length, " instance"),
        ),
        bars(cluster),
      ),
    ),
    h(
      "section",
      { "aria-labelledby": "nodes-h" },
      h("h2", { id: "nodes-h" }, "Nodes"),
      h(
        "ul",
        { class: "cards" },
        nodes.map((node) =>
          h(
            "li",
            { class: "card node-card", "data-node": node.name },
            h("h3", {}, nodeLink(node.name), " ", badge(node.status), node.cordoned ? badge("Cordoned") : ""),
            h(
              "p",
              { class: "muted" },
              `${node.driver} · ${node.instances}${plural(node.instances, " instance")} · synced `,
              h("time", { datetime: node.last_sync || "", title: node.last_sync || "" }, ago(node.last_sync)),
            ),
            bars(node),
          ),
        ),
      ),
      nodes.length
        ? ""
        : h(
            "p",
            { class: "muted" },
            "No node has joined yet: `multiverse token create`, then `multiverse worker`.",
          ),
    ),
    h(
      "section",
      { "aria-labelledby": "instances-h" },
      h("h2", { id: "instances-h" }, "Instances"),
      h(
        "p",
        { class: "states" },
        Object.entries(byState)
          .sort()
          .map(([name, count]) => h("span", {}, badge(name), ` ${count} `)),
      ),
      instanceTable(instances),
    ),
    h(
      "section",
      { "aria-labelledby": "events-h" },
      h("h2", { id: "events-h" }, "Recent events"),
      eventList(),
    ),
  ];
}

function instanceTable(instances) {
  return table(
    ["Name", "State", "Node", "IPv4", "Image", "CPUs", "Memory"],
    instances.map((i) => [
      instanceLink(i.name),
      badge(i.state),
      nodeLink(i.node),
      i.ipv4 || "—",
      i.image,
      i.cpus,
      bytes(i.memory),
    ]),
    "No instances.",
  );
}

async function nodePage(name) {
  const [node, instances] = await Promise.all([
    api("GET", `nodes/${encodeURIComponent(name)}`),
    list(`instances?node=${encodeURIComponent(name)}`),
  ]);
  const path = `nodes/${encodeURIComponent(name)}`;
  const maintain = (action, text) =>
    actionButton(action[0].toUpperCase() + action.slice(1), () => api("POST", `${path}/${action}`), {
      confirmText: text,
    });
  const labels = Object.entries(node.labels);
  return [
    h("h1", {}, `Node ${node.name} `, badge(node.status), node.cordoned ? badge("Cordoned") : ""),
    isAdmin()
      ? h(
          "div",
          { class: "actions", role: "group", "aria-label": "Node actions" },
          node.cordoned
            ? maintain("uncordon", "")
            : maintain("cordon", `Cordon ${node.name}? No new instance will be placed on it.`),
          maintain("drain", `Drain ${node.name}? It is cordoned and its instances are stopped.`),
          maintain("evacuate", `Evacuate ${node.name}? Its instances move to other nodes.`),
          maintain("restore", `Restore ${node.name}? It is uncordoned and its instances started again.`),
        )
      : "",
    dl([
      ["Driver", node.driver],
      ["Address", node.address],
      ["IPv4", node.ipv4],
      ["Version", node.version],
      [
        "Last sync",
        h(
          "time",
          { datetime: node.last_sync || "" },
          `${node.last_sync || "never"} (${ago(node.last_sync)})`,
        ),
      ],
    ]),
    ...bars(node),
    h("h2", {}, "Labels"),
    labels.length
      ? h(
          "ul",
          { class: "labels" },
          labels.map(([k, v]) =>
            h(
              "li",
              {},
              h("code", {}, `${k}=${v}`),
              isAdmin() && k in node.admin_labels
                ? actionButton(`Remove ${k}`, () => api("PATCH", `${path}/labels`, { labels: { [k]: null } }))
                : "",
            ),
          ),
        )
      : h("p", { class: "muted" }, "No labels."),
    isAdmin() ? labelForm(path) : "",
    h("h2", {}, "Instances"),
    instanceTable(instances),
  ];
}

function labelForm(path) {
  const input = h("input", {
    id: "label",
    name: "label",
    placeholder: "key=value",
    required: true,
    pattern: "[^=]+=.*",
  });
  return h(
    "form",
    {
      class: "inline",
      onsubmit: async (submit) => {
        submit.preventDefault();
        const [key, ...rest] = input.value.split("=");
        try {
          await api("PATCH", `${path}/labels`, { labels: { [key.trim()]: rest.join("=").trim() } });
          toast(`label ${key} set`);
          render();
        } catch (error) {
          toast(error.message, "error");
        }
      },
    },
    h("label", { for: "label" }, "Add label"),
    input,
    h("button", { type: "submit" }, "Set"),
  );
}

async function instancePage(name) {
  const path = `instances/${encodeURIComponent(name)}`;
  const details = h("div", { id: "details" });
  const consoleLog = h("pre", { class: "log", id: "console", tabindex: "0" }, "…");
  const fill = async () => {
    let info;
    try {
      info = await api("GET", `${path}/info`);
    } catch (error) {
      if (error.status === 404) {
        details.replaceChildren(h("p", { class: "notice" }, `${name} is deleted.`));
        return;
      }
      throw error;
    }
    const load = info.load ? info.load.map((x) => x.toFixed(2)).join(" ") : "—";
    const usage = (u) => (u ? `${bytes(u.used)} of ${bytes(u.total)}` : "—");
    details.replaceChildren(
      h(
        "p",
        { class: "state" },
        "State ",
        h("strong", { id: "state" }, badge(info.state)),
        ` (desired ${info.desired})`,
      ),
      info.message ? h("p", { class: "notice" }, info.message) : "",
      isAdmin() ? instanceActions(name, path) : "",
      isAdmin() ? moveForm(name, path, info.node) : "",
      dl([
        ["Node", nodeLink(info.node)],
        ["IPv4", info.ipv4],
        ["Image", info.image],
        ["Release", info.release],
        ["CPUs", info.cpus],
        ["Memory", bytes(info.memory)],
        ["Disk", bytes(info.disk)],
        [
          "Labels",
          Object.entries(info.labels)
            .map(([k, v]) => `${k}=${v}`)
            .join(", ") || "—",
        ],
        ["Created", info.created_at],
        ["Restarts", info.restarts],
        ["Load", load],
        ["Memory used", usage(info.memory_usage)],
        ["Disk used", usage(info.disk_usage)],
      ]),
      info.info_error ? h("p", { class: "muted" }, `Guest figures unavailable: ${info.info_error}`) : "",
    );
    if (isAdmin()) {
      api("GET", `${path}/logs`)
        .then((logs) => (consoleLog.textContent = logs.log || "(empty)"))
        .catch((error) => (consoleLog.textContent = error.message));
    }
  };
  // Subscribed before the first read: a change that lands while it is in flight still refreshes.
  onEvents((event) => {
    if (event.name === name || event.target === name) fill().catch((error) => toast(error.message, "error"));
  });
  await fill();
  return [
    h("h1", {}, `Instance ${name}`),
    details,
    isAdmin()
      ? terminalSection(name, path)
      : h("p", { class: "muted" }, "The terminal and the console log need an admin token."),
    isAdmin()
      ? h(
          "section",
          { "aria-labelledby": "console-h" },
          h("h2", { id: "console-h" }, "Console log"),
          consoleLog,
        )
      : "",
  ];
}

function instanceActions(name, path) {
  return h(
    "div",
    { class: "actions", role: "group", "aria-label": "Instance actions" },
    actionButton("Start", () => api("POST", `${path}/start`)),
    actionButton("Stop", () => api("POST", `${path}/stop`, {}), { confirmText: `Stop ${name}?` }),
    actionButton("Restart", () => api("POST", `${path}/restart`), { confirmText: `Restart ${name}?` }),
    actionButton("Delete", () => api("DELETE", path), {
      confirmText: `Delete ${name} and its disk?`,
      danger: true,
    }),
  );
}

function moveForm(name, path, current) {
  // A cold move (POST .../move): the instance stops, its disk goes to the target, it starts there.
  const select = h(
    "select",
    { id: "move-target", name: "target", required: true },
    h("option", { value: "" }, "choose a node"),
  );
  list("nodes")
    .then((nodes) => {
      for (const node of nodes) {
        if (node.name !== current && node.status === "Ready" && !node.cordoned) {
          select.append(h("option", { value: node.name }, node.name));
        }
      }
    })
    .catch((error) => toast(error.message, "error"));
  return h(
    "form",
    {
      class: "inline",
      onsubmit: async (submit) => {
        submit.preventDefault();
        const target = select.value;
        if (!window.confirm(`Move ${name} to ${target}? It stops while its disk is copied.`)) return;
        try {
          await api("POST", `${path}/move`, { node: target });
          toast(`moving ${name} to ${target}`);
        } catch (error) {
          toast(error.message, "error");
        }
      },
    },
    h("label", { for: "move-target" }, "Move to"),
    select,
    h("button", { type: "submit" }, "Move"),
  );
}

function terminalSection(name, path) {
  const box = h("div", { class: "terminal", id: "terminal" });
  const status = h("span", { class: "muted", role: "status" });
  const open = h("button", { type: "button", id: "open-terminal" }, "Open terminal");
  open.addEventListener("click", () => {
    open.disabled = true;
    const term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(box);
    fit.fit();
    const ws = socket(`${path}/shell?cols=${term.cols}&rows=${term.rows}`);
    const encoder = new TextEncoder();
    ws.onopen = () => {
      status.textContent = `connected (${term.cols}x${term.rows})`;
      term.focus();
    };
    ws.onmessage = (message) => {
      if (typeof message.data !== "string") {
        term.write(new Uint8Array(message.data));
        return;
      }
      const control = JSON.parse(message.data);
      if (control.type === "exit") term.write(`\r\n[exited with code ${control.code}]\r\n`);
      else if (control.type === "error") term.write(`\r\n[${control.message}]\r\n`);
    };
    ws.onclose = () => {
      status.textContent = "disconnected";
      open.disabled = false;
    };
    term.onData((data) => ws.readyState === WebSocket.OPEN && ws.send(encoder.encode(data)));
    term.onResize(({ cols, rows }) => {
      status.textContent = `connected (${cols}x${rows})`;
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols, rows }));
    });
    const refit = () => fit.fit();
    window.addEventListener("resize", refit);
    state.cleanup.push(() => {
      window.removeEventListener("resize", refit);
      ws.close();
      term.dispose();
    });
  });
  return h(
    "section",
    { "aria-labelledby": "terminal-h" },
    h("h2", { id: "terminal-h" }, "Terminal"),
    h("p", {}, open, " ", status),
    box,
  );
}

// ---- faults (issue 19): the ones in force, live by the events stream, healed from here ----

function faultTargets(fault) {
  // As the CLI takes them: "a / b,c" (a partition), "a → b" (a link), "b" (the others).
  const targets = fault.targets.join(",");
  if (fault.kind === "partition") return `${targets} ${fault.one_way ? "→" : "/"} ${fault.peers.join(",")}`;
  if (fault.kind === "link") return `${targets} → ${fault.peers.join(",") || "everyone"}`;
  return targets;
}

function until(iso) {
  if (!iso) return "never (until healed)";
  const seconds = Math.round((Date.parse(iso) - Date.now()) / 1000);
  return seconds > 0 ? `in ${seconds < 60 ? `${seconds} s` : `${Math.round(seconds / 60)} min`}` : "now";
}

async function faultsPage() {
  const faults = await api("GET", "faults");
  const heal = (fault) =>
    actionButton(`Heal ${fault.id}`, () => api("DELETE", `faults/${encodeURIComponent(fault.id)}`));
  return [
    h("h1", {}, "Faults"),
    h(
      "p",
      { class: "muted" },
      "Faults injected from outside the guests (`multiverse fault`); each heals by itself when it expires.",
    ),
    isAdmin() && faults.length
      ? h(
          "div",
          { class: "actions", role: "group", "aria-label": "Fault actions" },
          actionButton("Heal all", () => api("DELETE", "faults"), {
            confirmText: `Heal all ${faults.length} ${plural(faults.length, "fault")}?`,
            danger: true,
          }),
        )
      : "",
    h(
      "div",
      { id: "faults" },
      table(
        ["ID", "Kind", "Targets", "Parameters", "Started", "Expires", ...(isAdmin() ? [""] : [])],
        faults.map((fault) => [
          h("code", {}, fault.id),
          badge(fault.kind),
          faultTargets(fault),
          Object.entries(fault.params)
            .map(([key, value]) => `${key}=${value}`)
            .join(" ") || "—",
          h("time", { datetime: fault.started_at, title: fault.started_at }, ago(fault.started_at)),
          fault.expires_at
            ? h("time", { datetime: fault.expires_at, title: fault.expires_at }, until(fault.expires_at))
            : until(null),
          ...(isAdmin() ? [heal(fault)] : []),
        ]),
        "No faults in force.",
      ),
    ),
  ];
}

async function launchPage() {
  const [images, nodes] = await Promise.all([api("GET", "images"), list("nodes")]);
  const field = (id, label, input, help = "") =>
    h("div", { class: "field" }, h("label", { for: id }, label), input, help ? h("small", {}, help) : "");
  const problems = h("div", { id: "problems", role: "alert" });
  const form = h(
    "form",
    { class: "launch", id: "launch-form" },
    field(
      "name",
      "Name",
      h("input", {
        id: "name",
        name: "name",
        required: true,
        maxlength: 63,
        pattern: "[A-Za-z][A-Za-z0-9-]*",
        autocomplete: "off",
      }),
      "Letters, digits and hyphens; starts with a letter.",
    ),
    field(
      "image",
      "Image",
      h(
        "select",
        { id: "image", name: "image" },
        images.length
          ? images.map((i) =>
              h(
                "option",
                { value: i.name, selected: i.name === DEFAULT_IMAGE },
                `${i.name} (${i.kind}, on ${i.nodes.join(", ")})`,
              ),
            )
          : h("option", { value: DEFAULT_IMAGE }, DEFAULT_IMAGE),
      ),
    ),
    field(
      "cpus",
      "CPUs",
      h("input", { id: "cpus", name: "cpus", type: "number", min: 1, value: 1, required: true }),
    ),
    field(
      "memory",
      "Memory",
      h("input", { id: "memory", name: "memory", value: "1G", required: true }),
      "e.g. 512M, 2G",
    ),
    field("disk", "Disk", h("input", { id: "disk", name: "disk", value: "5G", required: true })),
    field(
      "node",
      "Node",
      h(
        "select",
        { id: "node", name: "node" },
        h("option", { value: "" }, "Any (the scheduler picks)"),
        nodes.map((n) => h("option", { value: n.name }, `${n.name} (${n.status})`)),
      ),
    ),
    field(
      "selector",
      "Node selector",
      h("input", { id: "selector", name: "selector", placeholder: "key=value, key=value" }),
    ),
    field(
      "strategy",
      "Strategy",
      h(
        "select",
        { id: "strategy", name: "strategy" },
        h("option", { value: "spread" }, "spread"),
        h("option", { value: "binpack" }, "binpack"),
      ),
    ),
    field(
      "user_data",
      "Cloud-init user-data",
      h("textarea", { id: "user_data", name: "user_data", rows: 4 }),
    ),
    h("button", { type: "submit" }, "Launch"),
  );
  form.addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const data = new FormData(form);
    const selector = {};
    for (const pair of String(data.get("selector")).split(",")) {
      const [key, ...value] = pair.split("=");
      if (key.trim()) selector[key.trim()] = value.join("=").trim();
    }
    const body = {
      name: data.get("name"),
      image: data.get("image"),
      cpus: Number(data.get("cpus")),
      memory: data.get("memory"),
      disk: data.get("disk"),
      selector,
      strategy: data.get("strategy"),
      user_data: data.get("user_data"),
    };
    if (data.get("node")) body.node = data.get("node");
    problems.replaceChildren();
    try {
      await api("POST", "instances", body);
      go(`instances/${encodeURIComponent(body.name)}`);
    } catch (error) {
      problems.replaceChildren(...explain(error));
    }
  });
  return [h("h1", {}, "Launch an instance"), problems, form];
}

function explain(error) {
  // The scheduler says why each node was refused, as data beside its message.
  if (!error.reasons?.length) return [h("p", { class: "error" }, error.message)];
  return [
    h("p", { class: "error" }, "No node can hold the instance:"),
    h(
      "ul",
      { class: "why", id: "why" },
      error.reasons.map(({ node, reason }) => h("li", {}, [h("strong", {}, node), `: ${reason}`])),
    ),
  ];
}

async function tokensPage() {
  const tokens = await api("GET", "tokens");
  const shown = h("div", { id: "new-token", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "inline", id: "token-form" },
    h(
      "div",
      { class: "field" },
      h("label", { for: "kind" }, "Kind"),
      h(
        "select",
        { id: "kind", name: "kind" },
        h("option", { value: "api" }, "API"),
        h("option", { value: "join" }, "join (a worker)"),
      ),
    ),
    h(
      "div",
      { class: "field" },
      h("label", { for: "role" }, "Role"),
      h(
        "select",
        { id: "role", name: "role" },
        h("option", { value: "viewer" }, "viewer"),
        h("option", { value: "admin" }, "admin"),
      ),
    ),
    h(
      "div",
      { class: "field" },
      h("label", { for: "ttl" }, "Lifetime (hours, empty: none)"),
      h("input", { id: "ttl", name: "ttl", type: "number", min: 1 }),
    ),
    h(
      "div",
      { class: "field" },
      h("label", { for: "description" }, "Description"),
      h("input", { id: "description", name: "description", maxlength: 255 }),
    ),
    h("button", { type: "submit" }, "Create"),
  );
  form.addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const data = new FormData(form);
    const body = { kind: data.get("kind"), role: data.get("role"), description: data.get("description") };
    if (data.get("ttl")) body.ttl_seconds = Number(data.get("ttl")) * 3600;
    try {
      const created = await api("POST", "tokens", body);
      await render();
      document
        .getElementById("new-token")
        .replaceChildren(
          h("p", {}, "The new token, shown this once (only a hash is kept):"),
          h("pre", { class: "secret", tabindex: "0" }, created.token),
        );
    } catch (error) {
      toast(error.message, "error");
    }
  });
  return [
    h("h1", {}, "Tokens"),
    form,
    shown,
    table(
      ["ID", "Kind", "Role", "Description", "Expires", "Created", ""],
      tokens.map((t) => [
        h("code", {}, t.id),
        t.kind,
        t.role || "—",
        t.description || "—",
        t.expires_at || "never",
        t.created_at,
        t.revoked
          ? "revoked"
          : actionButton(
              "Revoke",
              async () => {
                await api("DELETE", `tokens/${encodeURIComponent(t.id)}`);
                render();
              },
              { confirmText: `Revoke token ${t.id}? What uses it stops working.`, danger: true },
            ),
      ]),
      "No tokens.",
    ),
  ];
}

function loginPage(message = "") {
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    required: true,
    autocomplete: "off",
  });
  const form = h(
    "form",
    { class: "login" },
    h("label", { for: "token" }, "API token"),
    input,
    h("small", {}, "From `multiverse token create --api` or your client.toml. Kept in this tab only."),
    h("button", { type: "submit" }, "Log in"),
  );
  const problem = h("p", { class: "error", role: "alert" }, message);
  form.addEventListener("submit", async (submit) => {
    submit.preventDefault();
    sessionStorage.setItem(TOKEN, input.value.trim());
    try {
      const me = await api("GET", "whoami");
      sessionStorage.setItem(ROLE, me.role);
      connectEvents();
      go(location.pathname.startsWith("/ui/login") ? "" : location.pathname.slice(4).replace(/^\//, ""));
    } catch (error) {
      sessionStorage.removeItem(TOKEN);
      problem.textContent = error.message;
    }
  });
  return [h("h1", {}, "Log in"), problem, form];
}

function logout(message = "") {
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(ROLE);
  state.eventSocket?.close();
  state.eventSocket = null;
  state.events = [];
  showPage(loginPage(message));
}

// ---- routing: every /ui/... path is this page; the path picks the view ----

const routes = [
  [/^$/, overview],
  [/^nodes\/([^/]+)$/, nodePage],
  [/^instances\/([^/]+)$/, instancePage],
  [/^launch$/, launchPage],
  [/^tokens$/, tokensPage],
  [/^faults$/, faultsPage],
];

function showPage(children) {
  view.replaceChildren(...[children].flat());
  const signedIn = Boolean(sessionStorage.getItem(TOKEN));
  document.getElementById("nav").hidden = !signedIn;
  for (const item of document.querySelectorAll("[data-admin]")) item.hidden = !isAdmin();
  document.getElementById("whoami").textContent = signedIn ? sessionStorage.getItem(ROLE) : "";
}

async function render() {
  for (const undo of state.cleanup.splice(0)) undo();
  if (!sessionStorage.getItem(TOKEN)) {
    showPage(loginPage());
    return;
  }
  const path = location.pathname.replace(/^\/ui\/?/, "");
  for (const [pattern, page] of routes) {
    const match = path.match(pattern);
    if (!match) continue;
    try {
      // Subscribed before the first read, so a change made while it is in flight is not lost.
      if ([overview, nodePage, faultsPage].includes(page)) onEvents(() => refresh(page, match));
      showPage(await page(...match.slice(1).map(decodeURIComponent)));
      document.title = `${document.querySelector("h1")?.textContent || ""} · Multiverse`;
    } catch (error) {
      showPage([h("h1", {}, "Error"), h("p", { class: "error" }, error.message)]);
    }
    return;
  }
  showPage([h("h1", {}, "Not found"), h("p", {}, link("", "Back to the overview"))]);
}

function typing() {
  // Text typed into one of the page's forms and not sent yet: a redraw would throw it away.
  return [...document.querySelectorAll("main form input, main form textarea")].some(
    (field) => field.value !== field.defaultValue,
  );
}

async function refresh(page, match) {
  // A live page redraws from fresh data, keeping the reader's scroll position. While a form on
  // it holds unsent text it stays as it is; the next event (or sending the form) redraws it.
  if (typing()) return;
  const y = window.scrollY;
  const previous = state.cleanup.splice(0);
  try {
    const children = await page(...match.slice(1).map(decodeURIComponent));
    for (const undo of previous) undo();
    showPage(children);
    onEvents(() => refresh(page, match));
    window.scrollTo(0, y);
  } catch (error) {
    state.cleanup.push(...previous); // the page shown stays live
    toast(error.message, "error");
  }
}

function go(path) {
  history.pushState(null, "", `/ui/${path}`);
  render();
}

document.addEventListener("click", (click) => {
  const anchor = click.target.closest("a[href^='/ui/']");
  if (!anchor || click.ctrlKey || click.metaKey || click.shiftKey || anchor.target) return;
  click.preventDefault();
  go(anchor.getAttribute("href").slice(4));
});
window.addEventListener("popstate", render);
document.getElementById("logout").addEventListener("click", () => logout());
connectEvents();
render();
