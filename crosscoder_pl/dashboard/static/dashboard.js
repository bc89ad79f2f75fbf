// Crosscoder latent dashboard (crosscoder_pl.dashboard). Data: data/*.js files, each calling
// ccDashboard.receive(key, payload) (docs/dashboard.md), loaded on demand with <script src> tags so that the
// page works from file:// (where fetch() of local JSON is refused). Online (served by `analyze.py serve=true`)
// it also talks to the server's api/*.
// Safety: every text that comes from data or a server answer is put in the page with textContent or as
// an attribute value set through the DOM, never parsed as HTML.
"use strict";

(function () {
  const cc = (window.ccDashboard = window.ccDashboard || {});
  const loaded = {};
  const waiting = {};
  const PAGE_SIZE = 50;

  cc.receive = function (key, payload) {
    loaded[key] = payload;
    if (waiting[key]) {
      waiting[key].resolve(payload);
      delete waiting[key];
    }
  };

  function load(key) {
    if (key in loaded) return Promise.resolve(loaded[key]);
    if (waiting[key]) return waiting[key].promise;
    const entry = {};
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    waiting[key] = entry;
    const script = document.createElement("script");
    script.src = "data/" + key + ".js";
    script.charset = "utf-8";
    script.onerror = () => {
      delete waiting[key];
      entry.reject(new Error("could not load data/" + key + ".js"));
    };
    document.head.appendChild(script);
    return entry.promise;
  }

  // ------------------------------------------------------------------------------------------ helpers
  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [name, value] of Object.entries(props)) {
        if (name === "text") node.textContent = value;
        else if (name === "className") node.className = value;
        else if (name === "dataset") Object.assign(node.dataset, value);
        else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
        else node.setAttribute(name, value);
      }
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }
  const $ = (id) => document.getElementById(id);

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value !== "number") return String(value);
    if (value === 0) return "0";
    const abs = Math.abs(value);
    if (abs < 1e-3 || abs >= 1e5) return value.toExponential(2);
    return Number(value.toPrecision(3)).toString();
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function shardKey(latent) {
    const index = Math.floor(latent / state.meta.settings.latents_per_shard);
    return "shard-" + String(index).padStart(5, "0");
  }

  function tokenText(id) {
    const text = state.vocab[String(id)];
    return text === undefined ? "[" + id + "]" : text;
  }

  // Newlines stay line breaks (white-space: pre-wrap) but are also shown as a visible mark.
  function visible(text) {
    return text.replace(/\n/g, "↵\n");
  }

  function colour(activation, max) {
    const alpha = max > 0 ? Math.min(1, Math.max(0, activation / max)) : 0;
    return "rgba(255, 110, 0, " + alpha.toFixed(3) + ")";
  }

  // --------------------------------------------------------------------------------------------- state
  const state = {
    meta: null,
    table: null,
    vocab: {},
    order: [],
    sort: { key: "default", dir: -1 },
    page: 0,
    online: null,
  };

  function column(key) {
    return state.table.values[key];
  }

  // chat-only latents first, by base uselessness (−log ν_ε, high first; undefined last), then the rest by Δnorm.
  function defaultCompare(a, b) {
    const cls = column("class");
    const score = column("neg_log_nu_eps");
    const delta = column("delta_norm");
    const rank = (j) => (cls[j] === "chat_only" ? 0 : 1);
    if (rank(a) !== rank(b)) return rank(a) - rank(b);
    if (rank(a) === 0) {
      const sa = score[a] === null ? -Infinity : score[a];
      const sb = score[b] === null ? -Infinity : score[b];
      if (sa !== sb) return sb - sa;
    }
    const da = delta[a] === null ? -Infinity : delta[a];
    const db = delta[b] === null ? -Infinity : delta[b];
    return db - da || a - b;
  }

  function sortedFiltered() {
    const n = state.meta.n_latents;
    const cls = $("filter-class").value;
    const specific = $("filter-specific").checked;
    const minFreq = parseFloat($("filter-freq").value) || 0;
    const wanted = $("filter-latent").value.trim();
    const classes = column("class");
    const chatSpecific = column("chat_specific");
    const freq = column("firing_frequency");
    const freqWeb = column("frequency_web");
    const freqChat = column("frequency_chat");
    const rows = [];
    for (let j = 0; j < n; j++) {
      if (cls && classes[j] !== cls) continue;
      if (specific && chatSpecific[j] !== true) continue;
      const f = freq[j] !== null ? freq[j] : Math.max(freqWeb[j] || 0, freqChat[j] || 0);
      if (minFreq > 0 && !(f >= minFreq)) continue;
      if (wanted && !String(j).startsWith(wanted)) continue;
      rows.push(j);
    }
    if (state.sort.key === "default") {
      rows.sort(defaultCompare);
    } else {
      const values = column(state.sort.key);
      const dir = state.sort.dir;
      rows.sort((a, b) => {
        const va = values[a];
        const vb = values[b];
        if (va === vb) return a - b;
        if (va === null || va === undefined) return 1; // missing values last, whatever the direction
        if (vb === null || vb === undefined) return -1;
        return (va < vb ? -1 : 1) * dir;
      });
    }
    return rows;
  }

  // --------------------------------------------------------------------------------------------- table
  function buildTableHead() {
    const row = el("tr");
    for (const col of state.table.columns) {
      const th = el("th", { text: col.label, title: col.help, dataset: { key: col.key } });
      if (col.key === "class") th.className = "text";
      th.addEventListener("click", () => {
        if (state.sort.key === col.key) state.sort.dir = -state.sort.dir;
        else state.sort = { key: col.key, dir: col.key === "latent" || col.key === "class" ? 1 : -1 };
        state.page = 0;
        renderTable();
      });
      row.appendChild(th);
    }
    const head = document.querySelector("#latent-table thead");
    head.textContent = "";
    head.appendChild(row);
    const select = $("filter-class");
    const classes = [...new Set(column("class").filter((c) => c !== null))].sort();
    for (const c of classes) select.appendChild(el("option", { value: c, text: c }));
    for (const id of ["filter-class", "filter-specific", "filter-freq", "filter-latent"]) {
      $(id).addEventListener("input", () => {
        state.page = 0;
        renderTable();
      });
    }
    $("prev-page").addEventListener("click", () => {
      state.page = Math.max(0, state.page - 1);
      renderTable();
    });
    $("next-page").addEventListener("click", () => {
      state.page += 1;
      renderTable();
    });
  }

  function renderTable() {
    state.order = sortedFiltered();
    const pages = Math.max(1, Math.ceil(state.order.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    const body = document.querySelector("#latent-table tbody");
    body.textContent = "";
    for (const j of state.order.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE)) {
      const tr = el("tr", { dataset: { latent: String(j) } });
      for (const col of state.table.columns) {
        const value = column(col.key)[j];
        const td = el("td");
        if (col.key === "class") {
          td.className = "text";
          if (value !== null) td.appendChild(el("span", { className: "badge " + value, text: value }));
        } else {
          td.textContent = col.key === "latent" ? String(value) : fmt(value);
        }
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => {
        location.hash = "#/latent/" + j;
      });
      body.appendChild(tr);
    }
    for (const th of document.querySelectorAll("#latent-table th")) {
      th.classList.toggle("sorted-asc", th.dataset.key === state.sort.key && state.sort.dir === 1);
      th.classList.toggle("sorted-desc", th.dataset.key === state.sort.key && state.sort.dir === -1);
    }
    $("table-count").textContent =
      state.order.length + " of " + state.meta.n_latents + " latents" +
      (state.sort.key === "default" ? " · chat-only first, by −log ν_ε" : "");
    $("page-label").textContent = " page " + (state.page + 1) + " / " + pages + " ";
  }

  // -------------------------------------------------------------------------------------- latent view
  function renderTokens(container, tokens, activations, max, options) {
    const peak = options && options.peak;
    const turns = options && options.turns;
    const makeSpan = (i) => {
      const id = tokens[i];
      const text = tokenText(id);
      const span = el("span", {
        className: "tok" + (i === peak ? " peak" : ""),
        title: JSON.stringify(text) + " · act " + fmt(activations[i]) + " · id " + id,
        dataset: { act: String(activations[i]) },
      });
      span.textContent = visible(text);
      if (activations[i] > 0) span.style.backgroundColor = colour(activations[i], max);
      return span;
    };
    if (!turns || !turns.length) {
      const line = el("div", { className: "tokens" });
      for (let i = 0; i < tokens.length; i++) line.appendChild(makeSpan(i));
      container.appendChild(line);
      return;
    }
    for (let t = 0; t < turns.length; t++) {
      const [start, role] = turns[t];
      const end = t + 1 < turns.length ? turns[t + 1][0] : tokens.length;
      const block = el("div", { className: "turn" + (role ? " role-" + role.replace(/[^a-z]/gi, "") : "") });
      block.appendChild(el("span", { className: "role", text: role || "(before the first turn)" }));
      const line = el("div", { className: "tokens" });
      for (let i = start; i < end; i++) line.appendChild(makeSpan(i));
      block.appendChild(line);
      container.appendChild(block);
    }
  }

  function drawHistogram(canvas, histogram) {
    const ctx = canvas.getContext("2d");
    const web = histogram.web;
    const chat = histogram.chat;
    const bins = web.length;
    const totals = web.map((w, i) => w + chat[i]);
    const top = Math.max(1, ...totals);
    const width = canvas.width;
    const height = canvas.height - 14;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const barWidth = width / bins;
    for (let i = 0; i < bins; i++) {
      // log scale: counts span orders of magnitude
      const scale = (v) => (v > 0 ? (Math.log1p(v) / Math.log1p(top)) * height : 0);
      const hw = scale(totals[i]) * (totals[i] ? web[i] / totals[i] : 0);
      const hc = scale(totals[i]) - hw;
      ctx.fillStyle = "#5b8def";
      ctx.fillRect(i * barWidth, height - hw, barWidth - 1, hw);
      ctx.fillStyle = "#e8913a";
      ctx.fillRect(i * barWidth, height - hw - hc, barWidth - 1, hc);
    }
    ctx.fillStyle = "#444";
    ctx.font = "10px sans-serif";
    ctx.fillText("0", 0, canvas.height - 2);
    const label = fmt(histogram.max);
    ctx.fillText(label, width - ctx.measureText(label).width, canvas.height - 2);
  }

  function lensTable(title, lens) {
    const table = el("table");
    table.appendChild(el("tr", {}, [el("th", { text: "promoted", className: "text" }), el("th", { text: "logit" }),
      el("th", { text: "suppressed", className: "text" }), el("th", { text: "logit" })]));
    const n = Math.max(lens.promoted.length, lens.suppressed.length);
    for (let i = 0; i < n; i++) {
      const p = lens.promoted[i] || ["", null];
      const s = lens.suppressed[i] || ["", null];
      table.appendChild(el("tr", {}, [
        el("td", { className: "tok", text: JSON.stringify(p[0]) }), el("td", { text: fmt(p[1]) }),
        el("td", { className: "tok", text: JSON.stringify(s[0]) }), el("td", { text: fmt(s[1]) }),
      ]));
    }
    return el("div", { className: "lens" }, [el("h3", { text: title }), table]);
  }

  async function showLatent(j) {
    const view = $("latent-view");
    view.textContent = "";
    view.hidden = false;
    $("table-view").hidden = true;
    if (!(j >= 0 && j < state.meta.n_latents)) {
      view.appendChild(el("p", { className: "error", text: "no latent " + j + " in this dictionary" }));
      return;
    }
    view.appendChild(el("p", {}, [el("a", { href: "#/", text: "← all latents" })]));
    let shard;
    try {
      shard = await load(shardKey(j));
    } catch (error) {
      showError(error.message);
      return;
    }
    const record = shard.latents[j - shard.first];
    const cls = column("class")[j];
    view.appendChild(el("h2", { id: "latent-title", text: "Latent " + j + " " }, [
      cls ? el("span", { className: "badge " + cls, text: cls }) : null,
    ]));
    const stats = el("div", { className: "stats" });
    for (const col of state.table.columns) {
      if (col.key === "latent" || col.key === "class") continue;
      stats.appendChild(el("div", { title: col.help, text: col.label + ": " + fmt(column(col.key)[j]) }));
    }
    stats.appendChild(el("div", { text: "fired on web: " + record.fired.web + " / " + state.meta.n_tokens.web }));
    stats.appendChild(el("div", { text: "fired on chat: " + record.fired.chat + " / " + state.meta.n_tokens.chat }));
    view.appendChild(stats);
    if (state.online) {
      view.appendChild(el("button", { type: "button", text: "show this latent on the prompt", onclick: () => {
        $("chosen-latents").value = String(j);
        $("iv-latent").value = String(j);
        $("online-panel").scrollIntoView();
      } }));
    }

    view.appendChild(el("h3", { text: "Activation histogram (blue web, orange chat; log counts)" }));
    const canvas = el("canvas", { width: "480", height: "120", id: "histogram" });
    view.appendChild(canvas);
    drawHistogram(canvas, record.histogram);

    view.appendChild(el("h3", { text: "Logit lens: decoder vector through each model's unembedding" }));
    view.appendChild(el("p", { className: "muted", text: "base: " + state.meta.logit_lens_norm.base + " · chat: " + state.meta.logit_lens_norm.chat }));
    view.appendChild(el("div", { className: "columns" }, [
      lensTable("base model", record.logit_lens.base), lensTable("chat model", record.logit_lens.chat),
    ]));

    const max = Math.max(0, ...record.examples.web.map((e) => e.activation), ...record.examples.chat.map((e) => e.activation));
    const columns = el("div", { className: "columns", id: "examples" });
    for (const source of state.meta.sources) {
      const box = el("div", { className: "examples-" + source });
      box.appendChild(el("h3", { text: source + " examples (" + record.examples[source].length + ")" }));
      if (!record.examples[source].length) box.appendChild(el("p", { className: "muted", text: "never fired on " + source + " held-out tokens" }));
      for (const example of record.examples[source]) {
        const item = el("div", { className: "example" });
        item.appendChild(el("div", { className: "act", text: "activation " + fmt(example.activation) }));
        renderTokens(item, example.tokens, example.activations, max, { peak: example.peak, turns: example.turns });
        box.appendChild(item);
      }
      columns.appendChild(box);
    }
    view.appendChild(columns);
  }

  // ------------------------------------------------------------------------------------------- online
  async function api(path, body) {
    const response = await fetch(path, body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    let payload = null;
    try {
      payload = await response.json();
    } catch (error) {
      payload = null;
    }
    if (!response.ok) {
      const detail = payload && payload.detail ? (typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail)) : response.statusText;
      throw new Error(detail);
    }
    return payload;
  }

  function promptBody() {
    const body = {};
    if ($("mode-chat").checked) {
      body.messages = [...document.querySelectorAll(".turn-editor")].map((row) => ({
        role: row.querySelector("select").value, content: row.querySelector("textarea").value,
      }));
    } else {
      body.text = $("prompt-text").value;
    }
    return body;
  }

  function chosenLatents() {
    return $("chosen-latents").value.split(/[\s,]+/).filter((s) => s !== "").map(Number);
  }

  function addTurn(role, content) {
    const select = el("select", {}, ["user", "assistant", "system"].map((r) => el("option", { value: r, text: r })));
    select.value = role;
    const area = el("textarea", { rows: "2" });
    area.value = content;
    const row = el("div", { className: "turn-editor" }, [select, area,
      el("button", { type: "button", text: "×", onclick: () => row.remove() })]);
    $("chat-turns").appendChild(row);
  }

  function renderPrompt(result) {
    const box = $("prompt-result");
    box.textContent = "";
    const topMax = Math.max(0, ...result.top_latents.map((list) => (list.length ? list[0][1] : 0)));
    box.appendChild(el("h3", { text: "Tokens (colour: strongest latent; click a token for its top latents)" }));
    const line = el("div", { className: "tokens", id: "prompt-tokens" });
    const detail = el("div", { id: "token-detail", className: "muted" });
    result.tokens.forEach((text, i) => {
      const top = result.top_latents[i];
      const act = top.length ? top[0][1] : 0;
      const span = el("span", { className: "tok", title: JSON.stringify(text), dataset: { act: String(act), index: String(i) } });
      span.textContent = visible(text);
      if (act > 0) span.style.backgroundColor = colour(act, topMax);
      span.addEventListener("click", () => {
        for (const s of line.querySelectorAll(".selected")) s.classList.remove("selected");
        span.classList.add("selected");
        detail.textContent = "";
        detail.appendChild(el("div", { text: "token " + i + " " + JSON.stringify(text) + (top.length ? ": top latents" : ": no latent fires (BOS is never encoded)") }));
        const list = el("ul");
        for (const [latent, value] of top) {
          list.appendChild(el("li", {}, [el("a", { href: "#/latent/" + latent, text: "latent " + latent }),
            el("span", { text: " " + fmt(value) + (column("class")[latent] ? " (" + column("class")[latent] + ")" : "") })]));
        }
        detail.appendChild(list);
      });
      line.appendChild(span);
    });
    box.appendChild(line);
    box.appendChild(detail);
    for (const [latent, values] of Object.entries(result.latents)) {
      const max = Math.max(0, ...values);
      box.appendChild(el("h3", { text: "latent " + latent + " (max " + fmt(max) + ")" }));
      const row = el("div", { className: "tokens chosen-latent", dataset: { latent: latent } });
      result.tokens.forEach((text, i) => {
        const span = el("span", { className: "tok", title: "act " + fmt(values[i]), dataset: { act: String(values[i]) } });
        span.textContent = visible(text);
        if (values[i] > 0) span.style.backgroundColor = colour(values[i], max);
        row.appendChild(span);
      });
      box.appendChild(row);
    }
  }

  function renderIntervention(result) {
    const box = $("intervention-result");
    box.textContent = "";
    box.appendChild(el("p", { className: "muted", text: result.description }));
    const columns = el("div", { className: "columns" });
    for (const model of ["base", "chat"]) {
      const r = result.models[model];
      const part = el("div", { className: "next-tokens", dataset: { model: model } });
      part.appendChild(el("h3", { text: model + " model · KL(before ‖ after) = " + fmt(r.kl) + (r.edited ? "" : " (not edited)") }));
      const table = el("table");
      table.appendChild(el("tr", {}, [el("th", { text: "before", className: "text" }), el("th", { text: "p" }),
        el("th", { text: "after", className: "text" }), el("th", { text: "p" })]));
      for (let i = 0; i < r.before.length; i++) {
        table.appendChild(el("tr", {}, [
          el("td", { className: "tok", text: JSON.stringify(r.before[i][0]) }), el("td", { text: fmt(r.before[i][1]) }),
          el("td", { className: "tok", text: JSON.stringify(r.after[i][0]) }), el("td", { text: fmt(r.after[i][1]) }),
        ]));
      }
      part.appendChild(table);
      columns.appendChild(part);
    }
    box.appendChild(columns);
  }

  async function runPrompt() {
    $("prompt-status").textContent = "running…";
    try {
      const result = await api("api/encode", { ...promptBody(), latents: chosenLatents() });
      renderPrompt(result);
      $("prompt-status").textContent = result.tokens.length + " tokens · " + result.seconds.toFixed(2) + " s";
    } catch (error) {
      $("prompt-status").textContent = "error: " + error.message;
    }
  }

  async function runIntervention() {
    $("prompt-status").textContent = "running intervention…";
    try {
      const result = await api("api/intervene", {
        ...promptBody(), latent: Number($("iv-latent").value), model: $("iv-model").value,
        mode: $("iv-mode").value, factor: Number($("iv-factor").value),
      });
      renderIntervention(result);
      $("prompt-status").textContent = "intervention · " + result.seconds.toFixed(2) + " s";
    } catch (error) {
      $("prompt-status").textContent = "error: " + error.message;
    }
  }

  async function setupOnline() {
    if (!location.protocol.startsWith("http")) return;
    try {
      state.online = await api("api/info");
    } catch (error) {
      return; // a plain file server: offline page only
    }
    $("online-panel").hidden = false;
    const modeChanged = () => {
      const chat = $("mode-chat").checked;
      $("prompt-text").hidden = chat;
      $("chat-turns").hidden = !chat;
      $("add-turn").hidden = !chat;
    };
    $("mode-raw").addEventListener("change", modeChanged);
    $("mode-chat").addEventListener("change", modeChanged);
    $("add-turn").addEventListener("click", () => addTurn("user", ""));
    addTurn("user", "");
    $("run-prompt").addEventListener("click", runPrompt);
    $("run-intervention").addEventListener("click", runIntervention);
    $("prompt-text").placeholder = "Type a prompt (at most " + state.online.max_prompt_tokens + " tokens)…";
  }

  // ------------------------------------------------------------------------------------------- router
  function route() {
    const match = location.hash.match(/^#\/latent\/(\d+)$/);
    if (match) {
      showLatent(Number(match[1]));
    } else {
      $("latent-view").hidden = true;
      $("table-view").hidden = false;
      renderTable();
    }
  }

  async function start() {
    try {
      [state.meta, state.table, state.vocab] = await Promise.all([load("meta"), load("latents"), load("vocab")]);
    } catch (error) {
      showError(error.message + " (open index.html from the artifact's dashboard directory, next to data/)");
      return;
    }
    const m = state.meta;
    $("subtitle").textContent =
      m.n_latents + " latents · " + m.base_model + " vs " + m.chat_model + " · layer " + m.layer +
      " · examples from " + m.n_tokens.web + " web and " + m.n_tokens.chat + " chat held-out tokens";
    buildTableHead();
    await setupOnline();
    window.addEventListener("hashchange", route);
    route();
    document.body.dataset.ready = "true";
  }

  start();
})();
