"use strict";
// rlm view: renders the JSON in #rlm-data. Every piece of logged text goes into the page as text
// (never as markup): model and sandbox output are attacker-controlled. Its control characters
// are drawn as escapes (see UNSAFE), never as themselves.
(function () {
  const DATA = JSON.parse(document.getElementById("rlm-data").textContent);
  const app = document.getElementById("app");
  const views = Object.create(null); // run_id -> {run, el, iters: [details], parent: {runId, iter, block, call}}

  // ------------------------------------------------------------------ helpers
  // Drawn as an escape ("\u202e" in a badge), never as themselves: C0 controls but tab and newline,
  // DEL, C1 controls, the line and paragraph separators, the bidirectional marks, embeddings,
  // overrides and isolates, which make text show in another order than it is ("Trojan Source":
  // code that looks commented out but runs, "amount \u202e0001\u202c" shown as "amount 1000"),
  // and the characters drawn as nothing (zero-width spaces and joiners, word joiners, invisible
  // operators, the soft hyphen, variation selectors, fillers, the BOM, tag characters), which hide
  // text from the eye and from search (an instruction spelt in tag characters inside a prompt).
  // The set of rlm.display.visible (the terminal); the audit log escapes a part of it.
  const UNSAFE = /[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb\u{1d173}-\u{1d17a}\u{e0000}-\u{e0fff}]+/gu;
  const MAX_BADGES = 1000; // per text: past them, the escapes are plain text (a page of 10^6 spans is unusable)
  let pageBadges = 50000; // and for the whole page (code is drawn as many texts)
  const escOf = (c) => {
    const n = c.codePointAt(0);
    return n < 0x100 ? "\\x" + n.toString(16).padStart(2, "0") : n < 0x10000 ? "\\u" + n.toString(16).padStart(4, "0") : "\\U" + n.toString(16).padStart(8, "0");
  };
  // A run of unsafe characters as one text: each escaped; a run of one character repeated, once with its count.
  const escRun = (run) => {
    const chars = Array.from(run);
    return chars.length > 3 && chars.every((c) => c === chars[0]) ? `${escOf(chars[0])}\u00d7${chars.length}` : chars.map(escOf).join("");
  };
  const visibleText = (s) => s.replace(UNSAFE, escRun); // for what takes a string only (the window title)
  // *s* as nodes to append: text, each run of unsafe characters a badge holding their escapes.
  function textNode(s) {
    if (s.search(UNSAFE) < 0) return document.createTextNode(s);
    const frag = document.createDocumentFragment();
    let last = 0, n = 0;
    for (const m of s.matchAll(UNSAFE)) {
      if (n >= MAX_BADGES || pageBadges <= 0) break;
      if (m.index > last) frag.append(s.slice(last, m.index));
      const count = Array.from(m[0]).length;
      const what = count === 1 ? `U+${m[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}` : `${count} characters`;
      frag.append(el("span", { class: "esc", title: `${what} shown escaped` }, escRun(m[0])));
      last = m.index + m[0].length;
      n++;
      pageBadges--;
    }
    frag.append(visibleText(s.slice(last)));
    return frag;
  }
  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v == null) continue;
        if (k === "class") node.className = v;
        else if (k === "text") node.replaceChildren(textNode(String(v)));
        else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v);
      }
    }
    for (const kid of kids) {
      if (kid == null || kid === false) continue;
      node.append(kid instanceof Node ? kid : textNode(String(kid)));
    }
    return node;
  }
  const str = (v) => (v == null ? "" : typeof v === "string" ? v : JSON.stringify(v, null, 1));
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : 0);
  const fmtInt = (v) => num(v).toLocaleString("en-US");
  const fmtS = (v) => (typeof v === "number" ? (v < 10 ? v.toFixed(2) : v.toFixed(1)) + " s" : "");
  const fmtCost = (v) => (typeof v === "number" ? "$" + v.toFixed(v < 0.01 ? 5 : 4) : "unknown");
  const fmtBytes = (v) => (typeof v === "number" ? (v / 1048576).toFixed(1) + " MiB" : "");
  const tag = (text, kind) => el("span", { class: "tag" + (kind ? " " + kind : ""), text });
  // (white space made one space, but for what is shown escaped: the line and paragraph separators, \r, \v, \f)
  const short = (s, n) => { s = str(s).replace(/[^\S\u2028\u2029\r\v\f]+/g, " ").trim(); return s.length > n ? s.slice(0, n) + "\u2026" : s; };
  function pre(text, cls) { return el("pre", { class: cls || "", text: str(text) }); }

  // A <details> whose body is built the first time it is opened (large runs stay fast).
  function lazy(summary, build, cls) {
    const d = el("details", { class: cls || "" }, el("summary", null, ...[].concat(summary)));
    let built = false;
    d.addEventListener("toggle", () => {
      if (d.open && !built) { built = true; const body = el("div", { class: "body" }); d.append(body); build(body); }
    });
    return d;
  }

  // ---------------------------------------------------------- highlighter
  const KW = new Set(("False None True and as assert async await break class continue def del elif else except finally for " +
    "from global if import in is lambda nonlocal not or pass raise return try while with yield match case").split(" "));
  const BI = new Set(("print len range str int float list dict set tuple sorted sum min max enumerate zip map filter any all " +
    "isinstance open repr type abs round bool bytes reversed iter next hasattr getattr setattr super object Exception " +
    "llm_query llm_query_batched rlm_query rlm_query_batched FINAL FINAL_VAR context").split(" "));
  const TOKEN = /(#[^\r\n]*)|([rRbBuUfF]{0,2}(?:"""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\[\s\S]|[^"\\\r\n])*"?|'(?:\\[\s\S]|[^'\\\r\n])*'?))|(@[A-Za-z_][\w.]*)|(\b\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?j?\b|\b0[xXoObB][\da-fA-F_]+\b)|([A-Za-z_]\w*)/g;
  function highlight(code) {
    const out = el("pre", { class: "code" });
    let last = 0, prevWord = "";
    const plain = (s) => { if (s) out.append(textNode(s)); };
    const span = (cls, s) => out.append(el("span", { class: cls, text: s }));
    code = str(code);
    for (const m of code.matchAll(TOKEN)) {
      plain(code.slice(last, m.index));
      last = m.index + m[0].length;
      if (m[1]) span("com", m[1]);
      else if (m[2]) span("str", m[2]);
      else if (m[3]) span("dec", m[3]);
      else if (m[4]) span("num", m[4]);
      else {
        const w = m[5];
        if (KW.has(w)) span("kw", w);
        else if (prevWord === "def" || prevWord === "class") span("fn", w);
        else if (BI.has(w)) span("bi", w);
        else plain(w);
        prevWord = w;
        continue;
      }
      prevWord = "";
    }
    plain(code.slice(last));
    return out;
  }

  // ------------------------------------------------------------ run pieces
  function calls(block) { return (block && block.result && Array.isArray(block.result.rlm_calls)) ? block.result.rlm_calls : []; }
  // Calls past the block's cap (10,000 entries): counted in the trajectory, not listed.
  function omitted(block) {
    const o = (block && block.result && block.result.rlm_calls_omitted) || {};
    return { sub: num(o.sub_calls), tool: num(o.tool_calls) };
  }
  const callCount = (block) => { const o = omitted(block); return calls(block).length + o.sub + o.tool; };
  function notListed(block) {
    const o = omitted(block);
    const say = (n, what) => `${fmtInt(n)} more ${what}${n === 1 ? "" : "s"}`;
    const parts = [o.sub ? say(o.sub, "sub-call") : null, o.tool ? say(o.tool, "tool call") : null].filter(Boolean);
    return parts.length ? parts.join(" and ") + " not recorded (past the calls a block's log keeps; counted only)" : null;
  }
  function blocks(it) { return Array.isArray(it.code_blocks) ? it.code_blocks : []; }
  function finalText(f) { return Array.isArray(f) ? f[1] : f; }

  function outcomeTag(rec) {
    if (!rec) return null;
    const o = str(rec.outcome);
    return tag(o, o === "ok" ? "ok" : o.startsWith("limit") ? "warn" : "bad");
  }

  function renderCall(run, call, where) {
    const box = el("div", { class: "call", id: `c-${run.run_id}-${where.join("-")}` });
    const head = el("div", null, el("b", { text: call.type === "rlm" ? "rlm_query" : call.type === "tool" ? "tool call" : "llm_query" }), " ",
      tag(str(call.root_model)),
      tag(`${fmtInt(call.prompt_tokens)} in / ${fmtInt(call.completion_tokens)} out`),
      tag(fmtS(call.execution_time)),
      call.error ? tag(`${str(call.error_type) || "error"}`, "bad") : null,
      call.stop_reason ? tag(`stop: ${str(call.stop_reason)}`, call.stop_reason === "final" ? "ok" : "warn") : null);
    box.append(head);
    box.append(el("div", { class: "mute", text: "prompt" }), pre(call.prompt));
    box.append(el("div", { class: "mute", text: call.error ? "error" : "response" }), pre(call.error || call.response, call.error ? "stderr" : ""));
    if (call.type === "rlm") {
      const child = run.children && run.children[call.run_id];
      if (child) box.append(renderRun(child, { runId: run.run_id, where }));
      else if (call.run_id) box.append(el("div", { class: "mute", text: `child run ${call.run_id}: trajectory not found` }));
    }
    return box;
  }

  function renderBlock(run, block, ii, bi) {
    const res = block.result || {};
    const rec = run.audit && typeof block.audit === "number" ? run.audit.records[block.audit] : null;
    const cs = calls(block), n = callCount(block), unlisted = notListed(block);
    const wrap = el("div", { class: "card block", id: `b-${run.run_id}-${ii}-${bi}` });
    wrap.append(el("div", null, el("b", { text: `Code block ${bi + 1}` }), tag(fmtS(res.execution_time)),
      outcomeTag(rec),
      rec ? tag(`CPU ${fmtS(rec.cpu_s)}`) : null,
      rec ? tag(`peak ${fmtBytes(rec.max_rss_bytes)}`) : null,
      n ? tag(`${fmtInt(n)} sub-call${n === 1 ? "" : "s"}`) : null,
      unlisted ? tag(`${fmtInt(n - cs.length)} not recorded`, "warn") : null));
    wrap.append(highlight(block.code));
    if (res.stdout) wrap.append(el("div", { class: "mute", text: "stdout" }), pre(res.stdout, "stdout"));
    if (res.stderr) wrap.append(el("div", { class: "mute", text: "stderr / error" }), pre(res.stderr, "stderr"));
    if (!res.stdout && !res.stderr) wrap.append(el("div", { class: "mute", text: "(no output)" }));
    if (res.locals && typeof res.locals === "object" && Object.keys(res.locals).length) {
      wrap.append(lazy(`Variables (${Object.keys(res.locals).length})`, (body) => {
        const t = el("table");
        for (const [k, v] of Object.entries(res.locals)) t.append(el("tr", null, el("td", { text: k }), el("td", null, el("code", { text: short(v, 300) }))));
        body.append(t);
      }));
    }
    if (unlisted) wrap.append(el("div", { class: "warnbox omitted", text: unlisted }));
    if (cs.length) {
      const det = lazy([`Sub-calls (${fmtInt(cs.length)}${unlisted ? ` listed, ${fmtInt(n - cs.length)} more not recorded` : ""})`], (body) => {
        // 200 at a time: a block with thousands of sub-calls opens at once.
        let shown = 0;
        const more = el("button", { text: "show more" });
        const step = () => {
          const end = Math.min(cs.length, shown + 200);
          for (; shown < end; shown++) body.insertBefore(renderCall(run, cs[shown], [ii, bi, shown]), more);
          if (shown >= cs.length) more.remove(); else more.textContent = `show more (${cs.length - shown} left)`;
        };
        more.addEventListener("click", step);
        body.append(more);
        step();
        det.showAll = () => { while (shown < cs.length) step(); };
      }, "subcalls");
      wrap.append(det);
    }
    return wrap;
  }

  function iterationSummary(it, i) {
    const bs = blocks(it);
    const n = bs.reduce((a, b) => a + callCount(b), 0);
    const err = bs.some((b) => b.result && b.result.stderr);
    return [el("b", { text: `Iteration ${it.iteration ?? i + 1}` }), " ",
      el("span", { class: "mute", text: short(it.response, 90) }),
      tag(`${bs.length} block${bs.length === 1 ? "" : "s"}`),
      n ? tag(`${fmtInt(n)} sub-call${n === 1 ? "" : "s"}`) : null,
      tag(fmtS(it.iteration_time)),
      err ? tag("error", "bad") : null,
      it.final_answer != null ? tag("FINAL", "ok") : null].filter(Boolean);
  }

  function renderIteration(run, it, i) {
    const d = lazy(iterationSummary(it, i), (body) => {
      const prompt = Array.isArray(it.prompt) ? it.prompt : [];
      body.append(lazy(`Messages sent (${prompt.length})`, (b) => {
        for (const m of prompt) b.append(el("div", { class: "msg" }, el("div", { class: "role", text: str(m && m.role) }), pre(m && m.content)));
      }, "messages"));
      if (it.usage) body.append(el("div", { class: "mute", text: `root call: ${str(it.usage.model)}, ${fmtInt(it.usage.prompt_tokens)} in / ${fmtInt(it.usage.completion_tokens)} out, cost ${fmtCost(it.usage.cost_usd)}` }));
      body.append(el("h3", { text: "Model reply" }), pre(it.response, "reply"));
      blocks(it).forEach((b, bi) => body.append(renderBlock(run, b, i, bi)));
      if (it.final_answer != null) body.append(el("h3", { text: "Final answer" }), pre(finalText(it.final_answer), "stdout"));
    }, "iteration");
    d.id = `i-${run.run_id}-${i}`;
    return d;
  }

  function totalsTable(totals) {
    const t = el("table", null, el("tr", null, el("th", { text: "model" }), el("th", { class: "num", text: "calls" }),
      el("th", { class: "num", text: "input tokens" }), el("th", { class: "num", text: "output tokens" }), el("th", { class: "num", text: "cost" })));
    for (const [model, u] of Object.entries(totals || {})) {
      t.append(el("tr", null, el("td", { text: model }), el("td", { class: "num", text: fmtInt(u.calls) }),
        el("td", { class: "num", text: fmtInt(u.input_tokens) }), el("td", { class: "num", text: fmtInt(u.output_tokens) }),
        el("td", { class: "num", text: fmtCost(u.cost_usd) })));
    }
    return t;
  }

  // Iterations (top lane) and sub-calls (packed lanes below) against wall time, drawn on a canvas.
  function timeline(run) {
    const its = run.iterations;
    const spans = [];
    let t0 = Infinity, t1 = -Infinity;
    its.forEach((it, i) => {
      if (typeof it._t !== "number") return;
      const s = it._t, e = s + num(it.iteration_time);
      t0 = Math.min(t0, s); t1 = Math.max(t1, e);
      blocks(it).forEach((b) => calls(b).forEach((c) => {
        if (typeof c._t !== "number") return;
        spans.push([c._t, c._t + num(c.execution_time), i, c.type === "rlm", !!c.error]);
        t1 = Math.max(t1, c._t + num(c.execution_time));
      }));
    });
    if (!(t1 > t0)) return el("div", { class: "mute", text: "(no timing information)" });
    spans.sort((a, b) => a[0] - b[0]);
    const laneEnd = [];
    const MAXL = 24;
    for (const s of spans) {
      let l = laneEnd.findIndex((e) => e <= s[0]);
      if (l < 0) { l = laneEnd.length < MAXL ? laneEnd.length : laneEnd.indexOf(Math.min(...laneEnd)); }
      laneEnd[l] = s[1]; s.push(l);
    }
    const H = 24 + 8 * Math.max(1, laneEnd.length) + 18;
    const canvas = el("canvas", { class: "timeline", height: String(H) });
    const label = el("div", { class: "legend" }, `0 \u2013 ${fmtS(t1 - t0)} of wall time`,
      el("i", { style: "background:#2463c7" }), "iteration", el("i", { style: "background:#1f8a4c" }), "llm_query",
      el("i", { style: "background:#b7791f" }), "rlm_query", el("i", { style: "background:#c0392b" }), "failed call",
      el("span", { class: "mute", text: "  (click an iteration to open it)" }));
    const draw = () => {
      const W = canvas.clientWidth || 900;
      canvas.width = W;
      const ctx = canvas.getContext("2d");
      const x = (t) => 4 + (W - 8) * (t - t0) / (t1 - t0);
      ctx.clearRect(0, 0, W, H);
      its.forEach((it, i) => {
        if (typeof it._t !== "number") return;
        ctx.fillStyle = i % 2 ? "#5b8fe0" : "#2463c7";
        ctx.fillRect(x(it._t), 4, Math.max(1, x(it._t + num(it.iteration_time)) - x(it._t)), 16);
      });
      for (const s of spans) {
        ctx.fillStyle = s[4] ? "#c0392b" : s[3] ? "#b7791f" : "#1f8a4c";
        ctx.fillRect(x(s[0]), 26 + 8 * s[5], Math.max(1, x(s[1]) - x(s[0])), 6);
      }
      ctx.fillStyle = "#6a6f76"; ctx.font = "11px sans-serif";
      ctx.fillText("0 s", 4, H - 4);
      const end = fmtS(t1 - t0);
      ctx.fillText(end, W - 4 - ctx.measureText(end).width, H - 4);
    };
    canvas.addEventListener("click", (ev) => {
      const r = canvas.getBoundingClientRect();
      const t = t0 + (ev.clientX - r.left - 4) / (r.width - 8) * (t1 - t0);
      const i = its.findIndex((it) => typeof it._t === "number" && it._t <= t && t <= it._t + num(it.iteration_time));
      if (i >= 0) reveal({ runId: run.run_id, iter: i });
    });
    requestAnimationFrame(draw);
    window.addEventListener("resize", draw);
    return el("div", null, canvas, label);
  }

  function runTree(run) {
    const ul = el("ul");
    const add = (r, into) => {
      const li = el("li", null, el("span", { class: "link", text: r.run_id, onclick: () => reveal({ runId: r.run_id }) }),
        tag(str(r.metadata.root_model || "")), r.result ? tag(str(r.result.stop_reason), r.result.stop_reason === "final" ? "ok" : "warn") : tag("unfinished", "warn"));
      into.append(li);
      const kids = Object.values(r.children || {});
      if (kids.length) { const sub = el("ul"); kids.forEach((k) => add(k, sub)); li.append(sub); }
    };
    add(run, ul);
    return el("div", { class: "tree card" }, ul);
  }

  function renderAudit(audit, title) {
    const v = audit.verify || {};
    const status = v.ok
      ? el("div", null, tag("hash chain verified", "ok"), ` ${fmtInt(v.lines)} lines, ${audit.name}`)
      : el("div", { class: "errbox" }, tag("hash chain BROKEN", "bad"), ` ${audit.name}: ` +
          (v.bad_line ? `line ${v.bad_line}: ` : "") + str(v.reason));
    const recs = audit.records || [], first = num(audit.first) || 1, total = num(audit.total) || recs.length;
    return lazy([title || "Audit log", " ", v.ok ? tag("verified", "ok") : tag("broken", "bad"), tag(`${fmtInt(total)} executions`)], (body) => {
      body.append(status);
      if (first > 1) body.append(el("div", { class: "mute", text: `showing the last ${fmtInt(recs.length)} of ${fmtInt(total)} executions: ` +
        `the first ${fmtInt(first - 1)} are in the log, not on this page (the hash chain above covers them all)` }));
      const t = el("table", null, el("tr", null, el("th", { text: "#" }), el("th", { text: "time" }), el("th", { text: "outcome" }),
        el("th", { class: "num", text: "wall" }), el("th", { class: "num", text: "CPU" }), el("th", { class: "num", text: "peak memory" }), el("th", { text: "code" })));
      recs.forEach((r, i) => {
        const row = el("tr", { class: "clickable" }, el("td", { text: String(first + i) }), el("td", { text: str(r.time).slice(11, 23) }),
          el("td", null, outcomeTag(r), r.internal ? tag("internal") : null), el("td", { class: "num", text: fmtS(r.duration_s) }),
          el("td", { class: "num", text: fmtS(r.cpu_s) }), el("td", { class: "num", text: fmtBytes(r.max_rss_bytes) }),
          el("td", null, el("code", { text: short(r.code, 80) })));
        let open = null;
        row.addEventListener("click", () => {
          if (open) { open.remove(); open = null; return; }
          open = el("tr", null, el("td", { colspan: "7" }, highlight(r.code),
            r.code_cut ? el("div", { class: "mute", text: `\u2026 ${fmtInt(r.code_cut)} more characters, in the log` }) : null));
          row.after(open);
        });
        t.append(row);
      });
      body.append(t);
    }, "audit");
  }

  function renderRun(run, parent) {
    const meta = run.metadata || {};
    const res = run.result;
    const sum = run.summary || {};
    const stop = res ? str(res.stop_reason) : "unfinished";
    const box = el("details", { class: "run", id: `r-${run.run_id}` });
    box.append(el("summary", null, el("b", { text: parent ? `child run (depth ${meta.depth ?? "?"})` : "run" }), " ",
      el("code", { text: run.run_id }), tag(str(meta.root_model)), tag(stop, stop === "final" ? "ok" : "warn"),
      tag(`${fmtInt(sum.iterations)} iterations`)));
    views[run.run_id] = { run, el: box, iters: [], parent };
    let built = false;
    const build = () => {
      if (built) return; built = true;
      const body = el("div", { class: "body" });
      box.append(body);
      const g = el("div", { class: "grid card" });
      const row = (k, v, cls) => { g.append(el("div", { class: "k", text: k }), el("div", { class: cls || "", text: str(v) })); };
      row("question", meta.query == null ? "(in the context)" : meta.query);
      row("answer", res ? (res.answer == null ? "(none)" : res.answer) : "(the run did not finish: no .result.json)");
      row("stop reason", stop + (res && res.error ? ` \u2014 ${res.error}` : ""));
      row("models", `${str(meta.root_model)} (root)` + (meta.sub_model && meta.sub_model !== meta.root_model ? `, ${meta.sub_model} (sub-calls)` : ""));
      row("limits", `max_iterations ${str(meta.max_iterations)}, max_depth ${str(meta.max_depth)}` +
        (meta.budgets && Object.keys(meta.budgets).length ? ", " + Object.entries(meta.budgets).map(([k, v]) => `${k} ${v}`).join(", ") : ""));
      row("policy", meta.environment_kwargs ? `${str(meta.environment_kwargs.policy)} (sha256 ${str(meta.environment_kwargs.policy_sha256).slice(0, 12)}\u2026)` : "");
      row("context", meta.context_description);
      row("file", run.path);
      body.append(g);
      if (run.skipped_lines) body.append(el("div", { class: "warnbox", text: `${fmtInt(run.skipped_lines)} line(s) skipped: not JSON (a run cut off mid-write?)` }));
      if (run.too_deep_lines) body.append(el("div", { class: "warnbox", text: `${fmtInt(run.too_deep_lines)} line(s) skipped: JSON nested too deeply to read` }));
      if (run.pruned_values) body.append(el("div", { class: "warnbox", text: `${fmtInt(run.pruned_values)} line(s) of this run's files hold values nested too deeply: ` +
        `shown cut, their deepest parts replaced by \u201c${str(DATA.too_deep)}\u201d` }));
      body.append(el("div", { class: "stats" },
        ...[["iterations", fmtInt(sum.iterations)], ["code blocks", fmtInt(sum.code_blocks)],
          ["sub-calls" + (sum.sub_calls_not_listed ? ` (${fmtInt(sum.sub_calls_not_listed)} not recorded)` : ""), fmtInt(sum.sub_calls)],
          ...(sum.tool_calls ? [["tool calls" + (sum.tool_calls_not_listed ? ` (${fmtInt(sum.tool_calls_not_listed)} not recorded)` : ""), fmtInt(sum.tool_calls)]] : []),
          ["tokens in / out", `${fmtInt(sum.input_tokens)} / ${fmtInt(sum.output_tokens)}`], ["cost", fmtCost(sum.cost_usd)], ["wall time", fmtS(sum.time_s)]]
          .map(([k, v]) => el("div", { class: "stat" }, el("b", { text: v }), el("span", { text: k })))));
      if (!parent && Object.keys(run.children || {}).length) body.append(el("h3", { text: "Run tree" }), runTree(run));
      body.append(el("h3", { text: "Tokens and cost per model" }), totalsTable(run.totals));
      body.append(el("h3", { text: "Timeline" }), timeline(run));
      body.append(el("h3", { text: `Iterations (${run.iterations.length})` }));
      const v = views[run.run_id];
      const list = document.createDocumentFragment(); // built off-document, attached once
      run.iterations.forEach((it, i) => { const d = renderIteration(run, it, i); v.iters.push(d); list.append(d); });
      body.append(list);
      if (res && res.closing_response) body.append(el("h3", { text: "Closing call (no FINAL: asked for the best answer)" }), pre(res.closing_response));
      if (run.audit) body.append(el("h3", { text: "Sandbox audit log" }), renderAudit(run.audit));
      else body.append(el("div", { class: "mute", text: "(no audit log beside this trajectory)" }));
    };
    box.addEventListener("toggle", () => { if (box.open) build(); });
    return box;
  }

  // ------------------------------------------------------------ navigation
  // Open everything on the way to a run / iteration / block / sub-call, then scroll to it.
  function openRun(runId) {
    const v = views[runId];
    if (!v) {
      const owner = findOwner(runId);
      if (!owner) return null;
      revealCall(owner.runId, owner.where);
      return views[runId] ? openRun(runId) : null;
    }
    if (v.parent) revealCall(v.parent.runId, v.parent.where);
    v.el.open = true;
    v.el.dispatchEvent(new Event("toggle"));
    return views[runId];
  }
  function findOwner(runId) {
    for (const r of allRuns) {
      for (let i = 0; i < r.iterations.length; i++) {
        const bs = blocks(r.iterations[i]);
        for (let b = 0; b < bs.length; b++) {
          const cs = calls(bs[b]);
          for (let c = 0; c < cs.length; c++) if (cs[c].run_id === runId && cs[c].type === "rlm") return { runId: r.run_id, where: [i, b, c] };
        }
      }
    }
    return null;
  }
  function openIter(runId, i) {
    const v = openRun(runId);
    if (!v || !v.iters[i]) return null;
    v.iters[i].open = true;
    v.iters[i].dispatchEvent(new Event("toggle"));
    return v.iters[i];
  }
  function revealCall(runId, where) {
    const [i, b, c] = where;
    const d = openIter(runId, i);
    if (!d) return null;
    const blockEl = document.getElementById(`b-${runId}-${i}-${b}`);
    const det = blockEl && blockEl.querySelector(":scope > details.subcalls");
    if (det) { det.open = true; det.dispatchEvent(new Event("toggle")); if (det.showAll) det.showAll(); }
    return document.getElementById(`c-${runId}-${i}-${b}-${c}`);
  }
  function reveal(target) {
    if (DATA.kind === "dir") showRun(rootOf(target.runId));
    let node;
    if (target.call) node = revealCall(target.runId, target.call);
    else if (target.block != null) { openIter(target.runId, target.iter); node = document.getElementById(`b-${target.runId}-${target.iter}-${target.block}`); }
    else if (target.iter != null) node = openIter(target.runId, target.iter);
    else node = openRun(target.runId) && views[target.runId].el;
    if (target.msg && node) {
      const m = node.querySelector(":scope > .body > details.messages");
      if (m) { m.open = true; m.dispatchEvent(new Event("toggle")); }
    }
    if (node) {
      node.scrollIntoView({ block: "center" });
      node.classList.remove("flash"); void node.offsetWidth; node.classList.add("flash");
    }
  }

  // ---------------------------------------------------------------- search
  const allRuns = [];
  const rootFor = Object.create(null);
  (function collect(runs, root) {
    for (const r of runs) { allRuns.push(r); rootFor[r.run_id] = root || r.run_id; collect(Object.values(r.children || {}), root || r.run_id); }
  })(DATA.runs, null);
  function rootOf(runId) { return rootFor[runId]; }

  function* haystack() {
    for (const r of allRuns) {
      for (let i = 0; i < r.iterations.length; i++) {
        const it = r.iterations[i];
        const base = { runId: r.run_id, iter: i };
        yield [it.response, { ...base }, "reply"];
        const prompt = Array.isArray(it.prompt) ? it.prompt : [];
        for (const m of prompt) yield [m && m.content, { ...base, msg: true }, `message (${str(m && m.role)})`];
        const bs = blocks(it);
        for (let b = 0; b < bs.length; b++) {
          const res = bs[b].result || {};
          yield [bs[b].code, { ...base, block: b }, `code block ${b + 1}`];
          yield [res.stdout, { ...base, block: b }, `stdout of block ${b + 1}`];
          yield [res.stderr, { ...base, block: b }, `stderr of block ${b + 1}`];
          const cs = calls(bs[b]);
          for (let c = 0; c < cs.length; c++) {
            yield [cs[c].prompt, { ...base, call: [i, b, c] }, `sub-call ${c + 1} prompt`];
            yield [cs[c].response || cs[c].error, { ...base, call: [i, b, c] }, `sub-call ${c + 1} response`];
          }
        }
      }
    }
  }
  const hits = el("div", { id: "hits", hidden: "" });
  document.body.append(hits);
  function search(q) {
    hits.replaceChildren();
    if (!q) { hits.hidden = true; return; }
    // Found case-insensitively in the text itself: an index into a lowercased copy (where "\u0130"
    // takes two characters) would mark the wrong words.
    const needle = new RegExp(q.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "iu");
    let count = 0, total = 0;
    for (const [text, target, what] of haystack()) {
      const s = str(text);
      const found = needle.exec(s);
      if (!found) continue;
      const at = found.index, len = found[0].length;
      total++;
      if (count >= 200) continue;
      count++;
      const from = Math.max(0, at - 60);
      const snip = el("div", { class: "snip" }, (from ? "\u2026" : "") + s.slice(from, at), el("mark", { text: s.slice(at, at + len) }),
        s.slice(at + len, at + len + 100));
      const where = `${target.runId} \u00b7 iteration ${target.iter + 1} \u00b7 ${what}`;
      hits.append(el("div", { class: "hit", onclick: () => { hits.hidden = true; reveal(target); } }, el("div", { class: "where", text: where }), snip));
    }
    hits.prepend(el("div", { class: "hit where", text: total ? `${total} match${total === 1 ? "" : "es"}` + (total > count ? ` (first ${count} shown)` : "") : "no match" }));
    hits.hidden = false;
  }
  let timer = null;
  const box = document.getElementById("search");
  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => search(box.value.trim()), 200); });
  box.addEventListener("keydown", (e) => { if (e.key === "Enter") { clearTimeout(timer); search(box.value.trim()); } if (e.key === "Escape") { hits.hidden = true; } });

  // ------------------------------------------------------------------ pages
  const runEls = Object.create(null);
  function showRun(rootId) {
    if (DATA.kind !== "dir") return;
    app.replaceChildren(el("div", null, el("span", { class: "link", text: "\u2190 all runs", onclick: showIndex })));
    if (!runEls[rootId]) runEls[rootId] = renderRun(allRuns.find((r) => r.run_id === rootId), null);
    app.append(runEls[rootId]);
    runEls[rootId].open = true;
    runEls[rootId].dispatchEvent(new Event("toggle"));
  }
  function showIndex() {
    app.replaceChildren();
    app.append(el("h2", { text: `${DATA.runs.length} run${DATA.runs.length === 1 ? "" : "s"} in ${DATA.title}` }));
    const t = el("table", { id: "runs" }, el("tr", null, ...["run", "question", "answer", "stop reason", "iterations", "cost", "time"].map((h) => el("th", { text: h }))));
    for (const r of DATA.runs) {
      const res = r.result, s = r.summary || {};
      t.append(el("tr", { class: "clickable", onclick: () => showRun(r.run_id) },
        el("td", null, el("code", { text: r.run_id })), el("td", { text: short(r.metadata.query, 120) }),
        el("td", { text: res ? short(res.answer == null ? "(none)" : res.answer, 120) : "(unfinished)" }),
        el("td", { text: res ? str(res.stop_reason) : "unfinished" }), el("td", { class: "num", text: fmtInt(s.iterations) }),
        el("td", { class: "num", text: fmtCost(s.cost_usd) }), el("td", { class: "num", text: fmtS(s.time_s) })));
    }
    app.append(t);
    if (DATA.audits.length) {
      app.append(el("h2", { text: "Other audit logs" }));
      DATA.audits.forEach((a) => app.append(renderAudit(a, a.name)));
    }
  }

  document.title = visibleText(`rlm view \u2014 ${DATA.title}`);
  document.getElementById("title").replaceChildren(textNode(`rlm view \u2014 ${DATA.title}`));
  if (DATA.kind === "dir") showIndex();
  else {
    for (const r of DATA.runs) { const v = renderRun(r, null); app.append(v); v.open = true; v.dispatchEvent(new Event("toggle")); }
    DATA.audits.forEach((a) => { const d = renderAudit(a, `Audit log ${a.name}`); app.append(d); d.open = true; d.dispatchEvent(new Event("toggle")); });
  }
  document.body.dataset.ready = String(Math.round(performance.now())); // ms from navigation start
})();
